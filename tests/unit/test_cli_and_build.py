import json

import pytest

from stratus_cli.main import main as stratus
from stratus_model.build import artifact_digest, sha256_file


def test_build_writes_a_complete_directory_with_digest(tiny, tmp_path, capsys):
    out = tmp_path / "model"
    assert stratus(["model", "build", "--gguf", str(tiny.gguf), "--quant", "int4", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        assert sha256_file(out / name) == meta["sha256"]
    assert manifest["digest"] == artifact_digest(manifest["files"])
    assert manifest["quantization"] == "int4" and manifest["model_id"] == "tiny-int4"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_ids"] == [2] and gen["context_length"] == 256
    assert "layer 2/2" in capsys.readouterr().err  # progress is shown


def test_rebuild_is_deterministic(tiny, tmp_path):
    a = stratus(["model", "build", "--gguf", str(tiny.gguf), "--quant", "fp32", "--out", str(tmp_path / "a")])
    b = stratus(["model", "build", "--gguf", str(tiny.gguf), "--quant", "fp32", "--out", str(tmp_path / "b")])
    assert a == b == 0
    digest = lambda d: json.loads((tmp_path / d / "manifest.json").read_text())["digest"]
    assert digest("a") == digest("b")


def test_bad_input_fails_cleanly_and_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    rc = stratus(["model", "build", "--gguf", str(bad), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "broken.gguf: not a readable GGUF file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]  # no output, no temp dir


def test_a_build_never_replaces_a_folder_that_is_not_a_model(tiny, tmp_path, monkeypatch, capsys):
    # Given a folder with the user's files, worked in
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work / "notes.txt"), str(work / "sub" / ".."), str(work)):
        # When a build is asked to write there: refused, and nothing touched (`--out .` would empty it)
        assert stratus(["model", "build", "--gguf", str(tiny.gguf), "--out", out]) == 2
        assert "--out" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine too")
    assert stratus(["model", "build", "--gguf", str(tiny.gguf), "--out", str(tmp_path / "other")]) == 2
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "sub"] and (tmp_path / "other" / "keep.txt").exists()
    # and a model folder an earlier build wrote is replaced
    assert stratus(["model", "build", "--gguf", str(tiny.gguf), "--quant", "fp32", "--out", str(tmp_path / "m")]) == 0
    assert stratus(["model", "build", "--gguf", str(tiny.gguf), "--quant", "fp32", "--out", str(tmp_path / "m")]) == 0


def test_generate_prints_only_completion(tiny, capsys):
    rc = stratus(
        [
            "generate",
            "--model",
            str(tiny.dirs["fp32"]),
            "--max-tokens",
            "5",
            "--seed",
            "3",
            "--temperature",
            "0.8",
            "--threads",
            "1",
            "hello",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.endswith("\n") and "<|im_" not in out


def test_generate_rejects_bad_parameters_with_a_message(tiny, capsys):
    rc = stratus(["generate", "--model", str(tiny.dirs["fp32"]), "--temperature", "3", "hi"])
    assert rc == 2 and "temperature must be in [0.0, 2.0], got 3.0" in capsys.readouterr().err


def test_a_model_whose_files_were_changed_is_refused_by_the_worker_and_verify(tiny, tmp_path, capsys):
    import json
    import shutil

    from stratus.errors import ModelLoadError
    from stratus_worker.__main__ import check_model

    model = tmp_path / "model"
    shutil.copytree(tiny.dirs["int8"], model)
    digest = json.loads((model / "manifest.json").read_text())["digest"]
    assert check_model(model, digest)["digest"] == digest
    # When its chat template is changed (the golden check replays recorded token ids: it cannot see this)
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(ModelLoadError, match="chat_template.jinja: missing or different"):
        check_model(model, digest)
    assert stratus(["model", "verify", "--model", str(model), "--threads", "1"]) == 2
    assert "chat_template.jinja" in capsys.readouterr().err


def test_ordinary_cli_mistakes_are_one_error_line(tmp_path, capsys):
    import dataclasses

    from stratus_model.synthetic import TINY, write_tiny_gguf

    # a model folder that is not there
    assert stratus(["model", "publish", "--model", str(tmp_path / "nope"), "--bucket", "b"]) == 2
    assert "is not a built model" in capsys.readouterr().err
    # widths the 32-weight quantization blocks do not divide: int8 refused by name, fp32 builds
    write_tiny_gguf(tmp_path / "w48.gguf", cfg=dataclasses.replace(TINY, hidden=48, ffn=96), matrix_type="F16")
    assert (
        stratus(
            ["model", "build", "--gguf", str(tmp_path / "w48.gguf"), "--quant", "int8", "--out", str(tmp_path / "m")]
        )
        == 2
    )
    assert "not a multiple of the 32-weight quantization block" in capsys.readouterr().err


def test_a_pypi_model_is_named_and_an_unknown_or_missing_one_refused(tmp_path, monkeypatch, capsys):
    from stratus_model import build

    assert build.pypi_gguf("smollm2").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert stratus(["model", "build", "--pypi", "llama-9000", "--out", str(tmp_path / "m")]) == 2
    assert "unknown PyPI model 'llama-9000' (known: smollm2, gemma3-270m)" in capsys.readouterr().err
    missing = build.PyPIModel("not-a-package-here", "not_a_package_here", lambda d: d)
    monkeypatch.setitem(build.PYPI_MODELS, "elsewhere", missing)
    assert stratus(["model", "build", "--pypi", "elsewhere", "--out", str(tmp_path / "m")]) == 2
    assert "pip install not-a-package-here" in capsys.readouterr().err
    assert stratus(["model", "build", "--pypi", "smollm2", "--gguf", "x.gguf", "--out", str(tmp_path / "m")]) == 2
    assert "name one source" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_base_model_continues_text_and_refuses_a_chat_naming_itself(tiny, tmp_path, capsys):
    import shutil

    from stratus.errors import InvalidRequest
    from stratus.params import SamplingParams
    from stratus_engine.engine import Engine, GenerationRequest

    # Given a model without a chat template (a base model; --raw does the same for any model)
    base = tmp_path / "base"
    shutil.copytree(tiny.dirs["fp32"], base)
    (base / "chat_template.jinja").write_text("")
    engine = Engine.from_dir(base, threads=1)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = engine.generate([GenerationRequest(engine.encode("the"), params)])[0].text
    # When the CLI is given a prompt, then it continues the prompt as text
    args = ["generate", "--model", str(base), "--max-tokens", "6", "--threads", "1", "the"]
    assert stratus(args) == 0 and capsys.readouterr().out == expected + "\n"
    raw = ["generate", "--model", str(tiny.dirs["fp32"]), "--raw", "--max-tokens", "6", "--threads", "1", "the"]
    assert stratus(raw) == 0 and capsys.readouterr().out == expected + "\n"
    # and a chat is refused with the model's name and where to go instead
    with pytest.raises(
        InvalidRequest, match=r"model tiny-fp32 has no chat template \(a base model\): use /v1/completions"
    ):
        engine.encode_chat([{"role": "user", "content": "hi"}])
    assert stratus(raw[:-1] + ["--system", "be brief", "the"]) == 2
    assert "--system needs a chat" in capsys.readouterr().err


def test_make_serve_shows_a_base_model_a_completion_to_try():
    from types import SimpleNamespace

    from stratus_local.serve import banner

    stack = SimpleNamespace(
        model_id="m", model_ids=["m"], url="http://127.0.0.1:3000/v1", api_key="sk-dev", aws_endpoint="x", logs="l"
    )
    base, chat = banner(stack, 1, chat=False), banner(stack, 1, chat=True)
    assert "/v1/completions" in base and "completions.create(" in base and "messages" not in base
    assert "/v1/chat/completions" in chat and "chat.completions.create(" in chat
