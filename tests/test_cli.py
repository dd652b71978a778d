"""The `osd` command line: docs in sync, bad input as one-line errors with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from cli.config_doc import all_config_models, config_reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_doc_is_current():
    assert (ROOT / "docs" / "configuration.md").read_text().strip() == config_reference(all_config_models()).strip(), \
        "docs/configuration.md is stale: regenerate it with `.venv/bin/osd config-doc > docs/configuration.md`"


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--max-tokens", "0"], "invalid max_tokens"),
    (["generate", "hi", "--temperature", "-1"], "invalid temperature"),
    (["generate", "hi", "--top-p", "1.5"], "invalid top_p"),
    (["generate", "hi", "--target", "/no/such/model"], "not found"),
    (["generate", "hi", "--draft-layers", "a,b"], "comma-separated layer indices"),
])
def test_bad_input_is_a_one_line_error(argv, message):
    proc = subprocess.run([sys.executable, "-m", "cli.main", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama target with the char tokenizer (chat template included), as an HF model dir."""
    from support.tiny import tiny_llama
    from support.tiny_tokenizer import char_tokenizer

    path = tmp_path_factory.mktemp("tiny-target")
    model = tiny_llama(vocab=64, sharpness=3.0)
    model.config.max_position_embeddings = 16384  # Spec-Bench prompts are long in characters
    model.save_pretrained(path)
    char_tokenizer(64).save_pretrained(path)
    return path


def test_osd_distill_runs_end_to_end(tiny_model_dir, redis_url, tmp_path):
    """`osd distill --limit 8` on the vendored questions: 8 requests through the real Redis buffer,
    the training loop, the gate and a file registry; every record trained on or held out."""
    registry = tmp_path / "registry"
    argv = ["distill", "--limit", "8", "--max-tokens", "12", "--update-interval", "4", "--lr", "0.01",
            "--window", "4", "--redis-url", redis_url, "--registry-path", str(registry),
            "--target", str(tiny_model_dir), "--draft-layers", "1", "--gamma", "3"]
    proc = subprocess.run([sys.executable, "-m", "cli.main", *argv], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # cwd: no ../shared or repo-relative data to lean on
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distilling on 8 questions from v0" in proc.stdout
    windows = [line for line in proc.stdout.splitlines() if line.startswith("window")]
    assert [w.split("|")[0].split(":")[1].strip() for w in windows][:2] == ["4 req", "4 req"], proc.stdout
    assert all("0 req" in w for w in windows[2:]), proc.stdout  # at most the final flush's update
    done = next(line for line in proc.stdout.splitlines() if line.startswith("done:"))
    assert "8 requests, 2 updates" in done, done
    import redis

    r = redis.Redis.from_url(redis_url)
    info = r.xinfo_groups("osd:records:global")
    assert info and all(g["pending"] == 0 for g in info), info  # acked: nothing left unsettled
    r.close()


def test_dtype_defaults_to_auto_and_generate_reports_the_resolved_dtype(tiny_model_dir):
    import argparse

    from cli.models import add_model_args, model_configs
    from osd.models.loading import resolve_dtype

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    models, _ = model_configs(parser.parse_args([]))
    assert models.dtype == "auto"
    want = str(resolve_dtype("auto", "cpu")).removeprefix("torch.")
    proc = subprocess.run([sys.executable, "-m", "cli.main", "generate", "abc", "--raw", "--max-tokens", "4",
                           "--target", str(tiny_model_dir), "--draft-layers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"osd: target {tiny_model_dir} on cpu in {want} (auto: " in proc.stderr  # logged once at load
    assert f"tok/s | {want} |" in proc.stderr  # the stats line
    proc = subprocess.run([sys.executable, "-m", "cli.main", "generate", "abc", "--raw", "--max-tokens", "4",
                           "--target", str(tiny_model_dir), "--draft-layers", "1", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in float32 (configured), " in proc.stderr and " weight layout (measured: T(1)+T(8) " in proc.stderr
    assert "tok/s | float32 |" in proc.stderr
