"""Read template.yaml (CloudFormation short-form tags included) so tests build what it declares."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


class _Loader(yaml.SafeLoader):
    pass


def _tag(loader, suffix, node):
    name = "Fn::GetAtt" if suffix == "GetAtt" else "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_Loader.add_multi_constructor("!", _tag)


def load_template(path: Path = ROOT / "template.yaml") -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


def resolve(value, refs: dict):
    """Replace {"Ref": X} and {"Fn::GetAtt": [X, A]} using refs[X] / refs[(X, A)]; parameters default."""
    if isinstance(value, dict) and len(value) == 1:
        (k, v), = value.items()
        if k == "Ref":
            return refs[v]
        if k == "Fn::GetAtt":
            return refs[tuple(v)]
    if isinstance(value, dict):
        return {k: resolve(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, refs) for v in value]
    return value
