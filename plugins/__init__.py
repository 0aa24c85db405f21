"""Built-in ches_curate plugins, registered through the `ches_curate` entry-point group like any third-party plugin."""
