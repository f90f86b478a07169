"""One worker fleet per model: template.yaml (one model's stack) -> the stack of a catalogue.

template.yaml deploys one model. Its resources whose Metadata says `Stratus: {PerModel: true}` (the
jobs and batch queues and their dead-letter queues, the worker nested stacks, the dispatcher, the
queue alarms) are that model's; `render` adds a copy of each for every further catalogue entry,
named with the entry's `name` in front (Gemma3JobsQueue, Gemma3EcsWorkers, ...), in which:

  - references to per-model resources name the entry's own copies;
  - the per-model parameters (PER_MODEL) are the entry's values, where it gives them;
  - everything else (the table, the bucket, the alarm topic, the image) stays shared.

Outside the copies, every list item that names a per-model resource directly (an IAM statement, a
policy template, an ARN in a statement's Resource list) is repeated for each copy, and so is every
entry of a function's Events that does (a dead-letter queue's event source): so each role may use
every model's queues and nothing else. The first entry is the template's own model: it sets the
per-model parameters' defaults. The functions' STRATUS_MODELS (stratus.catalogue) lists them all.

A catalogue file (YAML): {"models": [{"name", "id", "digest", "uri", "context_length", "aliases",
"target", "image", "instance_type", "sagemaker_instance_type", "min_workers", "max_workers",
"backlog_per_worker"}]}. A further model's `target` (ecs | sagemaker) gives it that kind of fleet
whatever WorkerTarget says (the first model's is WorkerTarget's); `image` its own worker image.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

# template parameter -> catalogue entry key
PER_MODEL = {
    "ModelId": "id",
    "ModelDigest": "digest",
    "ModelUri": "uri",
    "ModelContextLength": "context_length",
    "GpuInstanceType": "instance_type",
    "SageMakerInstanceType": "sagemaker_instance_type",
    "MinWorkers": "min_workers",
    "MaxWorkers": "max_workers",
    "BacklogPerWorker": "backlog_per_worker",
    "WorkerImageUri": "image",
}
# a copy's worker kind (an entry's `target`) -> the template condition its resources need; a model
# that names one gets that kind's fleet, unconditioned, and not the other's. Unnamed: WorkerTarget's
TARGETS = {"ecs": "UseEcs", "sagemaker": "UseSageMaker"}
CONTEXT = "${ModelContextLength}"
NAME = re.compile(r"[A-Z][A-Za-z0-9]{0,30}")  # a prefix of logical ids
PATHS = ("CodeUri", "ContentUri", "Location")  # what a template names relative to itself


def resource_name(key: str) -> str:
    """A model's short name (gemma3-270m) -> the prefix of its resources (Gemma3270m)."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", key) if part)


def read_catalogue(path: Path) -> list[dict]:
    """A catalogue file -> its entries (ValueError naming what is wrong)."""
    raw = yaml.safe_load(Path(path).read_text())
    entries = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected {{models: [...]}} with at least one model")
    for i, e in enumerate(entries):
        missing = [k for k in ("name", "id", "digest") if not isinstance(e.get(k), str) or not e.get(k)]
        if missing:
            raise ValueError(f"{path}: models[{i}] needs {', '.join(missing)}")
        if not NAME.fullmatch(e["name"]):
            raise ValueError(f"{path}: models[{i}].name {e['name']!r}: a capital letter, then letters and digits")
        if e.get("target") not in (None, *TARGETS):
            raise ValueError(f"{path}: models[{i}].target must be one of {', '.join(TARGETS)} (unset: WorkerTarget)")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: two models share a name")
    return entries


def check_artifacts(entries: list[dict], s3) -> list[str]:
    """Each entry's published manifest against its digest -> the problems (none: the catalogue holds)."""
    from stratus.manifest import MANIFEST, split_uri

    problems = []
    for e in entries:
        if not e.get("uri"):
            problems.append(f"{e['id']}: no uri (publish it: stratus model publish)")
            continue
        bucket, prefix = split_uri(e["uri"])
        try:
            manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read())
        except Exception as exc:  # botocore raises many types
            problems.append(f"{e['id']}: cannot read {e['uri']}{MANIFEST}: {exc}")
            continue
        if manifest.get("digest") != e["digest"]:
            problems.append(
                f"{e['id']}: {e['uri']} holds digest {manifest.get('digest')}, the catalogue says {e['digest']}"
            )
        elif manifest.get("model_id") != e["id"]:
            problems.append(f"{e['id']}: {e['uri']} holds model {manifest.get('model_id')}")
    return problems


def per_model(template: dict) -> set[str]:
    return {
        n
        for n, r in template["Resources"].items()
        if isinstance(r.get("Metadata"), dict) and (r["Metadata"].get("Stratus") or {}).get("PerModel")
    }


def render(template: dict, entries: list[dict]) -> dict:
    """template.yaml's stack -> the stack serving every entry (the module docstring)."""
    out = copy.deepcopy(template)
    own = per_model(template)
    for param, key in PER_MODEL.items():
        if key in entries[0] and param in out["Parameters"]:
            out["Parameters"][param]["Default"] = entries[0][key]
    copies = []
    for e in entries[1:]:
        rename = {n: e["name"] + n for n in own}
        values = {p: str(e[k]) for p, k in PER_MODEL.items() if k in e}
        for n in sorted(own):
            resource = _substitute(copy.deepcopy(template["Resources"][n]), rename, values)
            kind = resource.get("Condition") if e.get("target") else None
            if kind in TARGETS.values() and resource.pop("Condition") != TARGETS[e["target"]]:
                continue  # (the other kind's fleet)
            out["Resources"][rename[n]] = resource
        copies.append((e["name"], rename))
    for n, r in out["Resources"].items():
        if n in template["Resources"] and n not in own:
            out["Resources"][n] = _expand(r, own, copies)
    variables = out["Globals"]["Function"]["Environment"]["Variables"]
    variables["STRATUS_MODELS"] = {"Fn::Sub": catalogue_json(entries)}
    return out


def catalogue_json(entries: list[dict]) -> str:
    """STRATUS_MODELS for the rendered stack, as an Fn::Sub text: the first entry's values are its
    parameters, each queue URL its queue's Ref."""

    def one(e: dict, i: int) -> dict:
        prefix = "" if i == 0 else e["name"]
        fields = (
            {"id": "${ModelId}", "digest": "${ModelDigest}", "uri": "${ModelUri}", "context_length": CONTEXT}
            if i == 0
            else {
                "id": e["id"],
                "digest": e["digest"],
                "uri": e.get("uri", ""),
                "context_length": int(e.get("context_length", 8192)),
            }
        )
        return fields | {
            "queue_url": f"${{{prefix}JobsQueue}}",
            "batch_queue_url": f"${{{prefix}BatchJobsQueue}}",
            "aliases": list(e.get("aliases") or []),
        }

    text = json.dumps([one(e, i) for i, e in enumerate(entries)], separators=(",", ":"))
    return text.replace(json.dumps(CONTEXT), CONTEXT)  # (a number: the parameter, unquoted)


def _substitute(value, rename: dict, values: dict):
    """A per-model resource's copy: its references renamed, the per-model parameters replaced."""
    if isinstance(value, dict):
        if set(value) == {"Ref"}:
            name = value["Ref"]
            return {"Ref": rename[name]} if name in rename else values.get(name, value)
        if set(value) == {"Fn::GetAtt"}:
            target, *attr = value["Fn::GetAtt"] if isinstance(value["Fn::GetAtt"], list) else [value["Fn::GetAtt"]]
            return {"Fn::GetAtt": [rename.get(target, target), *attr]}
        if set(value) == {"Fn::Sub"}:
            sub = value["Fn::Sub"]
            text, extra = (sub, None) if isinstance(sub, str) else sub
            text = re.sub(r"\$\{([^}!.]+)((?:\.[^}]+)?)\}", lambda m: _renamed(m, rename, values), text)
            return {"Fn::Sub": text if extra is None else [text, _substitute(extra, rename, values)]}
        if "DependsOn" in value:
            deps = value["DependsOn"]
            value = {**value, "DependsOn": [rename.get(d, d) for d in ([deps] if isinstance(deps, str) else deps)]}
        return {k: _substitute(v, rename, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, rename, values) for v in value]
    return value


def _renamed(m: re.Match, rename: dict, values: dict) -> str:
    name, attr = m.group(1), m.group(2)
    if name in rename:
        return "${" + rename[name] + attr + "}"
    if name in values and not attr:
        return values[name]
    return m.group(0)


def _direct(value, names: set[str]) -> bool:
    """Does `value` name one of `names` outside any list within it?"""
    if isinstance(value, dict):
        if set(value) == {"Ref"}:
            return value["Ref"] in names
        if set(value) == {"Fn::GetAtt"}:
            target = value["Fn::GetAtt"]
            return (target[0] if isinstance(target, list) else target.split(".")[0]) in names
        if set(value) == {"Fn::Sub"}:
            sub = value["Fn::Sub"]
            text = sub if isinstance(sub, str) else sub[0]
            return any(m in names for m in re.findall(r"\$\{([^}!.]+)", text))
        return any(_direct(v, names) for v in value.values())
    return False


def _expand(value, own: set[str], copies: list[tuple[str, dict]], key: str = ""):
    """A shared resource: each list item (or Events entry) naming a per-model resource, repeated
    for each copy (innermost lists first)."""
    if isinstance(value, list):
        out = []
        for item in (_expand(v, own, copies) for v in value):
            out.append(item)
            if _direct(item, own):
                out += [_substitute(copy.deepcopy(item), rename, {}) for _, rename in copies]
        return out
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)).startswith(("Fn::", "Ref")):
            return value  # (an intrinsic function's arguments are not a list of like items)
        out = {k: _expand(v, own, copies, k) for k, v in value.items()}
        if key == "Events":
            for k, v in list(out.items()):
                if _direct(v, own):
                    for name, rename in copies:
                        out[name + k] = _substitute(copy.deepcopy(v), rename, {})
        return out
    return value


def rebased(template: dict, root: Path, out_dir: Path) -> dict:
    """The template's relative paths (code, layers, nested stacks) as seen from out_dir."""
    import os

    def walk(value, key=""):
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if key in PATHS and isinstance(value, str) and not value.startswith(("s3://", "/")):
            return os.path.relpath(root / value, out_dir) + ("/" if value.endswith("/") else "")
        return value

    return walk(template)
