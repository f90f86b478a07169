"""Running a built graph directly in onnxruntime."""

import numpy as np
import onnx

PROMPT = [1, 50, 60, 70, 80, 90, 100, 110]


def empty_past(cfg, batch):
    return {
        f"past_key_values.{i}.{k}": np.zeros((batch, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
        for i in range(cfg.num_layers)
        for k in ("key", "value")
    }


def run(sess, ids, mask, positions, past):
    names = [o.name for o in sess.get_outputs()]
    out = sess.run(
        None,
        {
            "input_ids": np.asarray(ids, np.int64),
            "attention_mask": np.asarray(mask, np.int64),
            "position_ids": np.asarray(positions, np.int64),
            **past,
        },
    )
    return out[0], {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:])}


def corrupt(model_dir, tensor_suffix: str, factor: float) -> None:
    """Multiply one float32 initializer in model.onnx.data in place (a wrong scale, a bad copy)."""
    proto = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name.endswith(tensor_suffix))
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    with open(model_dir / info["location"], "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(length), np.float32) * factor
        f.seek(offset)
        f.write(values.astype(np.float32).tobytes())


def corrupt_tiles(model_dir, tensor_suffix: str, factor: float) -> None:
    """Multiply the float16 scales d of one BlockLinear's 4-bit tiles (stratus_model.tiles) in place."""
    proto = onnx.load(str(model_dir / "model.linear.onnx"), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name.endswith(tensor_suffix))
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    with open(model_dir / info["location"], "r+b") as f:
        f.seek(offset)
        q4 = np.frombuffer(f.read(length), np.uint8).reshape(-1, 320).copy()
        q4[:, 256:288] = (q4[:, 256:288].copy().view(np.float16) * factor).astype(np.float16).view(np.uint8)
        f.seek(offset)
        f.write(q4.tobytes())


def rehash(model_dir) -> None:
    """Rewrite the manifest's file hashes and digest to match the files as they are now: a model
    built wrong but described consistently, which only the golden check can refuse."""
    import json

    from stratus_model.build import artifact_digest, sha256_file

    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["files"] = {
        name: {"sha256": sha256_file(model_dir / name), "bytes": (model_dir / name).stat().st_size}
        for name in manifest["files"]
    }
    manifest["digest"] = artifact_digest(manifest["files"])
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
