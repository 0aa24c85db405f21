"""Built-in ches_curate plugins: listed in `ches_curate.plugins.DEFAULT_PLUGINS` and registered through the
same hooks as any third-party plugin (which are found through the `ches_curate` entry-point group)."""
