"""Graph configurations and the golden-output check a worker runs before it takes any job."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from stratus_cli.main import main as stratus
from stratus_engine.numerics import NumericsError, configurations, host_description, load_verified
from support.graphs import PROMPT, corrupt, corrupt_tiles, empty_past, rehash, run
from support.llama_ref import forward


def linear_error(tiny, quant: str, graph: str) -> float:
    sess = ort.InferenceSession(str(tiny.dirs[quant] / graph))
    s = len(PROMPT)
    got, _ = run(sess, [PROMPT], np.ones((1, s)), [np.arange(s)], empty_past(tiny.config, 1))
    ref = forward(tiny.weights, tiny.config, PROMPT)  # both builds hold the GGUF's Q4_1 values exactly
    return float(np.abs(got[0] - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_split_activations_compute_the_weights_at_float32_accuracy(tiny, quant):
    # Given the same weights, when activations are split into int8 hi + lo rows, the graph is
    # within float32 rounding of a numpy forward pass, and far closer than int8 activations.
    split = linear_error(tiny, quant, "model.onnx")
    int8 = linear_error(tiny, quant, "model.int8act.onnx")
    assert split < 2e-4, split
    assert int8 > 10 * split, (int8, split)


def test_quantized_builds_list_their_configurations_fastest_first(tiny):
    assert [c.name for c in configurations(tiny.dirs["int4"])] == [
        "fused-linear",
        "int8-activations",
        "fused-split",
        "split-activations",
    ]
    assert [c.graph for c in configurations(tiny.dirs["int8"])] == [
        "model.linear.onnx",
        "model.int8act.onnx",
        "model.fused.onnx",
        "model.onnx",
    ]
    assert [c.name for c in configurations(tiny.dirs["fp32"])] == ["default"]
    manifest = json.loads((tiny.dirs["int4"] / "manifest.json").read_text())
    assert "model.int8act.onnx" in manifest["files"] and "reference.onnx" not in manifest["files"]


def test_the_build_records_golden_outputs_of_the_reference(tiny):
    golden = json.loads((tiny.dirs["int4"] / "manifest.json").read_text())["golden"]
    assert "accuracy_level 0" in golden["reference"] and golden["max_logprob_error"] > 0
    assert len(golden["cases"]) == 4
    for case in golden["cases"]:
        assert len(case["tokens"]) == len(case["top_ids"]) == len(case["top_logprobs"]) == 16
        top = np.asarray(case["top_logprobs"])
        assert (np.diff(top, axis=1) <= 0).all()  # top-k in order
        assert [ids[0] for ids in case["top_ids"]] == case["tokens"]  # greedy: the top token each step


def test_a_worker_serves_a_configuration_that_passes(tiny):
    result = load_verified(tiny.dirs["int4"], threads=1)
    assert result.checks[-1].passed and result.checks[-1].configuration == result.configuration
    assert (
        result.model.graph
        == {
            "int8-activations": "model.int8act.onnx",
            "fused-linear": "model.linear.onnx",
            "fused-split": "model.fused.onnx",
            "split-activations": "model.onnx",
        }[result.configuration]
    )
    split = load_verified(tiny.dirs["int4"], threads=1, only="split-activations").checks[0]
    assert split.passed and split.max_logprob_error < 1e-3 and split.tokens_agree == split.positions == 64


def test_a_corrupted_model_is_refused_with_the_host_model_and_error(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny.dirs["int4"], broken)
    corrupt(broken, "layers.1/attn/qkv_proj.scales", 1.5)  # one layer's q/k/v scales 50% too large
    corrupt_tiles(broken, "layers.1/attn/qkv_proj.tiles", 1.5)  # and fused-linear's copy of them
    with pytest.raises(NumericsError) as err:
        load_verified(broken, threads=1)
    msg = err.value.message
    assert "model tiny-int4" in msg and "does not compute its golden outputs" in msg
    assert host_description().split(";")[0] in msg  # the CPU and its SIMD features
    assert "int8-activations   FAIL" in msg and "split-activations  FAIL" in msg and "max logprob error" in msg


def test_stratus_model_verify_prints_each_configuration(tiny, tmp_path, capsys):
    assert stratus(["model", "verify", "--model", str(tiny.dirs["int4"]), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host: ") and "serving: " in out and "max logprob error" in out
    broken = tmp_path / "broken"
    shutil.copytree(tiny.dirs["int8"], broken)
    corrupt(broken, "model.embed_tokens.gather_scales", -1.0)
    assert stratus(["model", "verify", "--model", str(broken), "--threads", "1"]) == 2
    assert "model.onnx.data: missing or different from the manifest" in capsys.readouterr().err
    rehash(broken)  # described consistently: the golden outputs refuse it
    assert stratus(["model", "verify", "--model", str(broken), "--threads", "1"]) == 2
    assert "stratus: error: model tiny-int8" in capsys.readouterr().err


def test_an_unknown_configuration_is_named(tiny, capsys):
    assert stratus(["model", "verify", "--model", str(tiny.dirs["fp32"]), "--configuration", "fast"]) == 2
    assert "no configuration 'fast' (this model has: default)" in capsys.readouterr().err
