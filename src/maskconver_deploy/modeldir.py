"""The model folder: one exported model and every artifact compiled from it (no torch here).

    model.onnx, model.raw.onnx, model.semantic.onnx   exported graphs (ModelMeta JSON in metadata key 'maskconver')
    model.json                                        ModelMeta of the panoptic graph + the export record
    reference.pt                                      the checkpoint the graphs were exported from (torch backend)
    <backend>[.raw].<ext> + <artifact>.json           compiled artifacts and their build records
    variants/s<size>-n<proposals>/                    re-exports at other sizes / proposal counts (bench)
Each backend module's `artifact_path` decides an artifact's name; `ModelDir` only dispatches to it, so a user
names a backend (`ort-int8-static`) and never a file.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import read_json, sha256_file, write_json
from maskconver_deploy.types import METADATA_KEY, ModelMeta

MODEL_JSON = "model.json"
REFERENCE_NAME = "reference.pt"
MODEL_FORMAT = "maskconver-model/1"
GRAPH_FILES = {"panoptic": "model.onnx", "raw": "model.raw.onnx", "semantic": "model.semantic.onnx"}
GRAPH_ORDER = ("panoptic", "raw", "semantic")
EXPORT_HINT = "export one with `maskconver export --checkpoint C --out DIR`"


def graph_suffix(graph: str) -> str:
    """'' for the panoptic graph, '.raw' / '.semantic' for the others (artifact names of every backend)."""
    if graph not in GRAPH_FILES:
        raise UserError(f"unknown graph '{graph}'; use one of {', '.join(GRAPH_ORDER)}")
    return "" if graph == "panoptic" else f".{graph}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:240]


def read_onnx(path: str | Path, require_meta: bool = True) -> tuple[Any, ModelMeta | None]:
    """Load an ONNX file and the ModelMeta in its metadata. UserError (one line, naming the file) for a missing,
    truncated or corrupt file, and (with `require_meta`) for a graph without our metadata."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError("no such ONNX file", path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError for truncated files, OSError, ValueError ...
        raise UserError(f"not a readable ONNX model: truncated or corrupt ({type(exc).__name__})", path) from None
    if not model.graph.node or not model.graph.output:
        raise UserError("not a readable ONNX model: truncated or corrupt (no nodes or no outputs)", path)
    meta = onnx_meta(model, path if require_meta else None)
    if meta is None and require_meta:
        raise UserError(f"not a maskconver graph: no '{METADATA_KEY}' metadata; {EXPORT_HINT}", path)
    return model, meta


def onnx_meta(model: Any, path: Path | None = None) -> ModelMeta | None:
    """The ModelMeta stored in an ONNX model's metadata_props (None if absent; bad JSON is a UserError if `path`)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return ModelMeta.from_dict(json.loads(prop.value))
            except (ValueError, KeyError, TypeError) as exc:
                if path is not None:
                    raise UserError(f"the '{METADATA_KEY}' metadata is not valid ({_first_line(exc)})", path) from None
                return None
    return None


def record_path(artifact: str | Path) -> Path:
    """The build record beside an artifact: `<artifact>.json` (the same rule in every backend)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


class ModelDir:
    """An exported model folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"no such model folder; {EXPORT_HINT}", self.path)
        sidecar = self.path / MODEL_JSON
        if not sidecar.is_file():
            raise UserError(f"not a model folder: no {MODEL_JSON}; {EXPORT_HINT}", self.path)
        data = read_json(sidecar)
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT or not isinstance(data.get("export"), dict):
            raise UserError(f"not a model sidecar (expected format '{MODEL_FORMAT}' with an export record)", sidecar)
        try:
            self.meta: ModelMeta = ModelMeta.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"invalid model metadata ({_first_line(exc)})", sidecar) from None
        self.record: dict[str, Any] = data["export"]

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    # -- graphs ---------------------------------------------------------------------------------------------------
    def graphs(self) -> list[str]:
        """Exported graphs present in the folder, in the order panoptic, raw, semantic."""
        listed = self.record.get("graphs", {})
        return [g for g in GRAPH_ORDER if g in listed and self.onnx_path(g).is_file()]

    def onnx_path(self, graph: str = "panoptic") -> Path:
        graph_suffix(graph)  # validates the name
        return self.path / GRAPH_FILES[graph]

    def graph_meta(self, graph: str = "panoptic") -> ModelMeta:
        """The ModelMeta of one graph (the panoptic meta with `output` set to that graph)."""
        graph_suffix(graph)
        return dataclasses.replace(self.meta, output=graph)

    def reference_path(self) -> Path:
        return self.path / REFERENCE_NAME

    def source_sha256(self, graph: str) -> str | None:
        """sha256 of an exported graph as recorded at export time (None if not recorded)."""
        entry = self.record.get("graphs", {}).get(graph)
        return entry.get("sha256") if isinstance(entry, dict) else None

    # -- artifacts ------------------------------------------------------------------------------------------------
    def artifact_path(self, name: Any, graph: str = "panoptic") -> Path:
        """Where backend `name` keeps its artifact for `graph` in this folder (the backend module decides)."""
        from maskconver_deploy.backends import backend_module, parse_backend

        graph_suffix(graph)
        parsed = parse_backend(str(name))
        return Path(backend_module(parsed.family).artifact_path(self.path, parsed, graph))

    def compile(
        self,
        name: Any,
        graph: str = "panoptic",
        calib: Path | None = None,
        force: bool = False,
        workspace_gb: float | None = None,
    ) -> Path:
        """Build backend `name`'s artifact for `graph` from this folder's ONNX graph; returns the artifact path.

        The backend module writes the artifact atomically and its build record `<artifact>.json`; if a module
        writes none, a minimal record is written here. `workspace_gb` is passed to TensorRT only.
        """
        from maskconver_deploy.backends import require_backend

        parsed, module = require_backend(str(name))
        if parsed.family.startswith("torch"):
            raise UserError(f"backend '{parsed}' runs the PyTorch checkpoint ({REFERENCE_NAME}); nothing to compile")
        source = self.onnx_path(graph)
        if not source.is_file():
            exported = ", ".join(self.graphs()) or "none"
            raise UserError(f"no {graph} graph in this folder (exported: {exported}); export it with "
                            f"`maskconver export --output {graph} ...`", self.path)  # fmt: skip
        out = self.artifact_path(parsed, graph)
        kwargs: dict[str, Any] = {"calib": calib, "force": force}
        if workspace_gb is not None and parsed.family == "tensorrt":
            kwargs["workspace_gb"] = workspace_gb
        started = datetime.now(UTC)
        built = Path(module.compile_onnx(source, out, parsed, **kwargs))
        record = record_path(built)
        if built != source and not record.is_file():
            write_json(record, {
                "backend": str(parsed), "family": parsed.family, "precision": parsed.precision.value,
                "artifact": built.name, "artifact_sha256": sha256_file(built), "graph": graph,
                "source_onnx": source.name, "source_onnx_sha256": sha256_file(source),
                "built_at": started.isoformat(timespec="seconds"),
            }, force=True)  # fmt: skip
        if built != source and record.is_file():  # every build record names the merge path it was built with
            content = read_json(record)
            content["merge"], content["mask_activation"] = self.meta.merge, self.meta.mask_activation
            write_json(record, content, force=True)
        return built

    def artifacts(self) -> list[dict[str, Any]]:
        """Every artifact present: backend, graph, precision, file, bytes, built (UTC), source_ok.

        `source_ok` is True when the artifact's build record names the current ONNX graph (same sha256), False
        when it was built from another export (recompile with --force), None when there is no record.
        """
        from maskconver_deploy.backends import FAMILY_MODULES, BackendName, backend_module

        rows: list[dict[str, Any]] = []
        current = {g: sha256_file(self.onnx_path(g)) for g in self.graphs()}
        reference = self.reference_path()
        if reference.is_file():
            rows.append(_row("torch", "all", "fp32", reference, None, True))
        seen: set[Path] = {reference}
        for family, module_name in FAMILY_MODULES.items():
            if module_name == "torch_ref":
                continue
            try:
                module = backend_module(family)
            except ImportError:
                continue
            for precision in module.PRECISIONS.get(family, ()):
                name = BackendName(family, precision)
                for graph in GRAPH_ORDER:
                    try:
                        path = Path(module.artifact_path(self.path, name, graph))
                    except UserError:
                        continue
                    if path in seen or not path.is_file():
                        continue
                    seen.add(path)
                    if graph != "panoptic" and path == Path(module.artifact_path(self.path, name, "panoptic")):
                        continue  # a backend without a separate name for this graph
                    record = _read_record(path)
                    if path == self.onnx_path(graph):  # ONNX Runtime fp32 runs the exported graph itself
                        record = {"built_at": self.record.get("exported_at")}
                        source_ok: bool | None = True
                    elif record is None or graph not in current:
                        source_ok = None
                    else:
                        source_ok = record.get("source_onnx_sha256") == current[graph]
                    rows.append(_row(str(name), graph, precision.value, path, record, source_ok))
        return rows


def _read_record(artifact: Path) -> dict[str, Any] | None:
    path = record_path(artifact)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _row(backend: str, graph: str, precision: str, path: Path, record: dict[str, Any] | None,
         source_ok: bool | None) -> dict[str, Any]:  # fmt: skip
    return {
        "backend": backend,
        "graph": graph,
        "precision": precision,
        "file": path.name,
        "bytes": path.stat().st_size,
        "built": (record or {}).get("built_at"),
        "source_ok": source_ok,
        "calibration": (record or {}).get("calibration_manifest_hash"),
    }
