"""What the MLflow UI shows of a run: its MLflow Model (served in a fresh process), its datasets, the
URL `practicum ui` lands on, and a study's chart view (opened in Chromium where there is one)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from modules.diffusion.module import DiffusionModule
from mlflow.entities import Metric

from pipelines import chart_view
from pipelines import tracking as trk
from pipelines.cli import landing_url
from pipelines.generate import load_checkpoint
from pipelines.run import load_experiment, run_experiment
from tests.helpers import GPT_CONFIG, gpt_small

ROOT = Path(__file__).resolve().parents[2]
DDPM = [f"--model.init_args.{k}={v}" for k, v in {
    "block_out_channels": "[8, 16]", "attention": "[false, true]", "num_timesteps": 50, "num_sample_steps": 4,
    "num_eval_samples": 20, "eval_batch_size": 20, "classifier_checkpoint": "null",
    "select_guidance": "null", "select_sample_steps": "null"}.items()] + [
    "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1", "--data.init_args.batch_size=8", "--data.init_args.train_limit=32",
    "--system_metrics=false", "--log_model=true"]


def predict_in_fresh_process(uri: str, run_id: str, frame: dict, params: dict, cwd: Path):
    """``mlflow.pyfunc.load_model("runs:/ID/model").predict(...)`` in a new interpreter, as a user serves it."""
    code = (
        "import json, sys, mlflow, numpy as np, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"m = mlflow.pyfunc.load_model('runs:/{run_id}/model')\n"
        f"out = m.predict(pd.DataFrame({frame!r}), params={params!r})\n"
        "print(json.dumps(np.asarray(out).tolist()))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_gpt_run_logs_a_pyfunc_model_that_generates_in_a_fresh_process(tracking_uri, tmp_path):
    res = run_experiment(GPT_CONFIG, [*gpt_small(), "--log_model=true", "--data.init_args.test_fraction=0.05"],
                         tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    # MLflow's fluent model logging moved neither the process's store nor $MLFLOW_TRACKING_URI
    assert "MLFLOW_TRACKING_URI" not in os.environ and trk.resolve_tracking_uri() == "sqlite:///mlruns/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(res.run_id)
    mlflow.set_tracking_uri(tracking_uri)
    signature = mlflow.models.get_model_info(f"runs:/{res.run_id}/model").signature
    assert signature.inputs.input_names() == ["prompt"] and signature.params is not None
    assert run.data.tags["practicum.model_uri"] == f"runs:/{res.run_id}/model"

    text = predict_in_fresh_process(tracking_uri, res.run_id, {"prompt": ["ROMEO:", "First"]},
                                    {"max_new_tokens": 12, "seed": 3}, tmp_path)
    reference = load_checkpoint(res.checkpoint)  # the best checkpoint, as `practicum generate` loads it
    assert text == [reference.generate_text(p, 12, temperature=0.8, seed=3) for p in ("ROMEO:", "First")]

    # the data the run used, per split, as MLflow datasets with their context
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    assert len({d.digest for d in inputs.values()}) == 3 and all(d.name.startswith("shakespeare") for d in inputs.values())
    data = load_experiment(GPT_CONFIG, [*gpt_small(), "--data.init_args.test_fraction=0.05"]).datamodule
    data.setup("fit")
    assert json.loads(inputs["validation"].profile)["num_examples"] == len(data.val_dataloader().dataset)


@pytest.mark.slow
def test_ddpm_run_logs_a_pyfunc_model_that_samples_the_asked_digits(tracking_uri, tmp_path):
    res = run_experiment(ROOT / "configs/diffusion/ddpm_mnist_cpu.yaml", DDPM, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    images = np.asarray(predict_in_fresh_process(tracking_uri, res.run_id, {"label": [3, 5]}, {"seed": 1}, tmp_path))
    module = DiffusionModule.load_from_checkpoint(res.checkpoint, map_location="cpu", weights_only=True).eval()
    with torch.no_grad():
        expected, _ = module.sample(2, labels=torch.tensor([3, 5]), seed=1)
    assert images.shape == (2, 28, 28) and 0 <= images.min() and images.max() <= 1
    np.testing.assert_allclose(images, ((expected[:, 0] + 1) / 2).numpy(), atol=1e-5)
    # training/validation/test datasets of the map-style MNIST carry the schema of one example
    run = mlflow.MlflowClient(tracking_uri).get_run(res.run_id)
    schemas = [json.loads(i.dataset.schema) for i in run.inputs.dataset_inputs]
    assert schemas and all("mlflow_tensorspec" in s for s in schemas)


def test_register_puts_the_model_in_the_registry(tracking_uri):
    res = run_experiment(GPT_CONFIG, [*gpt_small(), "--register=tiny-gpt"], tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    versions = mlflow.MlflowClient(tracking_uri).search_model_versions("name = 'tiny-gpt'")
    assert [v.run_id for v in versions] == [res.run_id]


def test_ui_lands_on_the_newest_study_in_the_model_training_view(tracking_uri):
    client = trk.MlflowClient(tracking_uri)
    base = "http://127.0.0.1:5999"
    assert landing_url(tracking_uri, base) == f"{base}/#/experiments"  # an empty store: the list
    ids = {}
    for name in ("older-study", "newer-study"):
        ids[name] = trk.get_or_create_experiment(client, name, tracking_uri)
        client.create_run(ids[name], tags={trk.TAG_STUDY: name, trk.TAG_ROLE: "parent"})
    client.create_run(trk.get_or_create_experiment(client, "gpt", tracking_uri))  # a plain run, newer still
    url = landing_url(tracking_uri, base)
    assert url == f"{base}/#/experiments/{ids['newer-study']}/runs?workflowType=machine_learning"
    assert landing_url(tracking_uri, base, "older-study").endswith(f"/experiments/{ids['older-study']}/runs"
                                                                    "?workflowType=machine_learning")
    # MLflow 3 opens an untagged experiment in its GenAI view
    assert client.get_experiment(ids["older-study"]).tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_url_of_a_server_leaves_credentials_out():
    assert trk.ui_base("https://alice:s3cret@mlflow.example.org:8443/") == "https://mlflow.example.org:8443/"


def test_hugging_face_finetune_is_logged_in_the_transformers_flavour(tracking_uri, tiny_llama_dir, tmp_path):
    """A LoRA fine-tune of a (tiny, local) Llama: its merged best checkpoint is a transformers pipeline that
    mlflow.transformers loads and that generates what the module's own merged weights generate."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} plus {i}?", "a": f"{2 * i}."}) + "\n" for i in range(24)))
    args = [f"--model.init_args.backbone={tiny_llama_dir}", "--model.init_args.method=lora", "--model.init_args.r=4",
            "--model.init_args.lr=0.01", "--model.init_args.export=false", "--model.init_args.gradient_checkpointing=false",
            "--model.init_args.attn_implementation=null", f"--data.init_args.source={data}",
            f"--data.init_args.tokenizer={tiny_llama_dir}", "--data.init_args.fields={instruction: q, response: a}",
            "--data.init_args.max_length=96", "--data.init_args.batch_size=4", "--trainer.max_steps=3",
            "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2", "--trainer.precision=32-true",
            "--system_metrics=false", "--log_model=true"]
    res = run_experiment(ROOT / "configs/finetune/hf_lora.yaml", args, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    mlflow.set_tracking_uri(tracking_uri)
    info = mlflow.models.get_model_info(f"runs:/{res.run_id}/model")
    assert "transformers" in info.flavors
    components = mlflow.transformers.load_model(f"runs:/{res.run_id}/model", return_type="components")
    from modules.finetune.module import FinetuneModule

    best = FinetuneModule.load_from_checkpoint(res.checkpoint, map_location="cpu", weights_only=True)
    merged = best.save_merged(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(components["model"](ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_study_runs_model_is_named_after_its_study_variant_and_seed():
    from pipelines.models import model_name

    tags = {"practicum.study": "gpt-quick", "practicum.variant": "layers 2", "practicum.seed": "0"}
    assert model_name(tags) == "gpt-quick-layers-2-seed0"
    assert model_name({**tags, "practicum.seed": "None"}) == "gpt-quick-layers-2"
    assert model_name({"practicum.seed": "0"}) == "model"  # a run of its own keeps runs:/ID/model


def test_a_module_without_a_forward_of_its_own_serves_nothing():
    """The NumPy classics inherit LightningModule.forward (which only raises): no tensor pyfunc for them."""
    from modules.classics.module import KNNModule
    from pipelines.models import kind_of
    from tests.pipelines.toy import ToyModule

    class Served(ToyModule):
        def forward(self, x):
            return self.net(x)

    assert kind_of(KNNModule(k=3)) is None and kind_of(ToyModule()) is None
    assert kind_of(Served()) == "tensor"


# What a study's runs log, as the pipeline logs it: curves over steps, end-of-run values at step 0.
CURVES = ("train/loss", "val/loss")
VALUES = ("test/loss", "budget/steps", "disk/checkpoint_bytes", "finetune/trainable_fraction", "gen/tokens_per_s",
          "mem/params_bytes", "perf/samples_per_s", "time/fit_s", "accuracy", "system/cpu_utilization_percentage")


def log_study(client, uri: str, name: str = "ui-study") -> str:
    """A finished study as it lands in MLflow, fast: a parent, two variants x two seeds, a tuning trial
    (no variant tag), then the chart view its parent writes as it closes. Returns the experiment id."""
    exp = trk.get_or_create_experiment(client, name, uri)
    parent = client.create_run(exp, tags={trk.TAG_STUDY: name, trk.TAG_ROLE: "parent"}, run_name=name).info.run_id
    runs = [("narrow", 0), ("narrow", 1), ("wide", 0), ("wide", 1), (None, 0)]
    for variant, seed in runs:
        tags = ({trk.TAG_VARIANT: variant, trk.TAG_ROLE: "variant"} if variant else
                {trk.TAG_ROLE: "trial", "practicum.trial_of": "narrow"})
        run = client.create_run(exp, run_name=f"{variant or 'trial'} seed={seed}",
                                tags={"mlflow.parentRunId": parent, trk.TAG_STUDY: name, **tags}).info.run_id
        width = 2.0 if variant == "wide" else 1.0
        metrics = [Metric(k, width / (step + 1) + 0.01 * seed, 0, step) for k in CURVES for step in range(1, 9)]
        metrics += [Metric(k, width + seed, 0, 0) for k in VALUES]
        client.log_batch(run, metrics=metrics)
        client.set_terminated(run)
    chart_view.save(client, exp)
    client.set_terminated(parent)
    return exp


def test_a_studys_chart_view_puts_its_training_curves_first(tracking_uri):
    client = trk.MlflowClient(tracking_uri)
    exp = log_study(client, tracking_uri)
    tag = trk.SHARED_VIEW_TAG + trk.CHART_VIEW
    first = json.loads(client.get_experiment(exp).tags[tag])
    state = chart_view.decode(json.dumps(first))
    sections = {s["uuid"]: s["name"] for s in state["compareRunSections"]}
    # MLflow's own order would be budget, disk, finetune, gen, mem, perf, test, time, train, val, Model, System
    assert list(sections.values()) == ["train", "val", "test", "budget", "disk", "finetune", "gen", "mem", "perf",
                                       "time", "Model metrics", "System metrics"]
    charts = {c["metricKey"]: c for c in state["compareRunCharts"]}
    assert set(charts) == {*CURVES, *VALUES}
    assert [c["metricKey"] for c in state["compareRunCharts"]][:3] == ["train/loss", "val/loss", "test/loss"]
    assert {k: c["type"] for k, c in charts.items() if c["type"] == "LINE"} == {k: "LINE" for k in CURVES}
    assert sections[charts["accuracy"]["metricSectionId"]] == "Model metrics"
    assert sections[charts["system/cpu_utilization_percentage"]["metricSectionId"]] == "System metrics"
    assert charts["system/cpu_utilization_percentage"]["xAxisKey"] == "time"  # as the UI draws system metrics
    assert state["isAccordionReordered"] and state["groupBy"]["groupByKeys"] == [
        {"mode": "tag", "groupByData": trk.TAG_VARIANT}]
    # a second study on the experiment rewrites the view and keeps when it was made
    client.log_metric(client.search_runs([exp], max_results=1)[0].info.run_id, "gen/bleu", 0.5, step=0)
    chart_view.save(client, exp)
    again = json.loads(client.get_experiment(exp).tags[tag])
    assert again["createdAt"] == first["createdAt"] and "gen/bleu" in str(chart_view.decode(json.dumps(again)))
    # the links open the view where there is one; an experiment without (a plain run's) opens as before
    base = "http://127.0.0.1:5000"
    assert landing_url(tracking_uri, base, "ui-study") == (f"{base}/#/experiments/{exp}/runs"
                                                           "?workflowType=machine_learning&viewStateShareKey=practicum-charts")
    plain = trk.get_or_create_experiment(client, "gpt", tracking_uri)
    assert trk.runs_url(base, plain, client) == f"{base}/#/experiments/{plain}/runs?workflowType=machine_learning"


@pytest.mark.slow
def test_the_ui_opens_a_studys_charts_on_its_training_curves_and_keeps_the_model_training_view(tracking_uri, tmp_path):
    """`benchmarks/ui_screenshot.py` in headless Chromium on `practicum ui`: the landing URL's chart view
    opens on train/ or val/, a run page and the compare page stay in the model-training view, and
    grouping by variant shows the seeded runs only."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("needs a Chromium (Debian's chromium, or $CHROMIUM) and the ui-check extra (playwright)")
    pytest.importorskip("playwright")
    log_study(trk.MlflowClient(tracking_uri), tracking_uri)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ui_screenshot.py"), "--tracking_uri", tracking_uri,
                        "--study", "ui-study", "--out", str(tmp_path / "ui.png"), "--checks-only"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    sections = re.search(r"chart sections: (.+)", p.stdout)[1].split(", ")
    assert sections[0] == "train (1)" and sections[-1] == "System metrics (1)", sections
    for check in ("a run page in the model-training view", "the compare page in the model-training view",
                  "the chart view in the model-training view", "grouping by variant holds seeded runs only"):
        assert f"ok   {check}" in p.stdout, p.stdout
    groups = ast.literal_eval(re.search(r"groups in the browser: (\{.*?\})", p.stdout)[1])
    assert groups == {"narrow": 2, "wide": 2}  # the trial is not in a variant's group
