#!/usr/bin/env python3
"""
End-to-end check of the bundle in a real MONAI Label server (monailabel 0.8.5), in its own virtual environment.

Not part of the fast pytest suite (the file name does not match ``test_*.py``); it takes several minutes::

    python3 tests/integration/monailabel_e2e.py [--work DIR] [--venv VENV] [--model model.pt] [--keep]

Steps (each command is printed to stderr; its output goes to ``WORK/logs``):

1. a virtual environment ``WORK/venv`` (``python3 -m venv``; ``pip install monailabel==0.8.5 -e REPO``, which
   brings the project's pins, among them ``pydicom>=2.4.4,<3``: MONAI Label's pydicom-seg fails with pydicom 3),
   or an existing one given by ``--venv`` (checked to hold monailabel 0.8.5 and pydicom 2);
2. a model: ``python -m monai.bundle run training`` on the synthetic demo with decoy lesions (96 cases, 12 epochs,
   128x128 as inference.json; about 8 minutes on 2 CPU cores), or ``--model model.pt``;
3. studies: a few demo cases with decoys (2-D NIfTI, as the model was trained) and one non-square PNG picture;
4. ``monailabel apps --download --name monaibundle``, the repository's ``bundle/`` copied to
   ``apps/monaibundle/model/NAME`` with ``models/model.pt``;
5. ``monailabel start_server ... --conf models NAME --conf zoo_source github --conf sam2 false --host 127.0.0.1``
   (the two ``--conf`` switches keep the server offline: no zoo list, no SAM2 checkpoint) in its own process
   group, waiting for ``/info/``;
6. ``POST /infer/NAME?image=ID&output=image`` for each study with two prompts naming different lung zones (the
   study's own report, and the same report with left and right swapped) and with none; every returned label
   file must have the image's shape (rows, columns of the displayed image), an integer dtype and labels in
   {0, 1} (``channel_def``); the two prompts must give different masks on at least one demo study;
7. the server is stopped by its process group id;
8. the bundle's own inference (``python -m monai.bundle run --config_file inference.json --input_dir ...
   with the studies' own reports in texts.csv``, PNG masks) must give the same mask as MONAI Label for prompt A.

The last line on stdout is one JSON object with what was found; the exit status is 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MONAILABEL = "monailabel==0.8.5"
# prompt A of a demo study is its own report, prompt B the same report with left and right swapped (other zones,
# where a decoy lesion may be); the PNG picture gets these two fixed reports
PROMPT_A = "Unilateral pulmonary infection, one infected area, upper left lung."
PROMPT_B = "Unilateral pulmonary infection, one infected area, upper right lung."
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Run with the venv's Python by ``inspect``: reads images and returned label files (numpy/nibabel/PIL).
INSPECT = r"""
import json, sys
import numpy as np

def load(path):
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib
        return np.asanyarray(nib.load(path).dataobj)
    from PIL import Image
    return np.asarray(Image.open(path))

req = json.loads(sys.stdin.read())
out = {}
for study in req["studies"]:
    image = load(study["image"])  # NIfTI: MONAI layout (columns, rows); PNG: (rows, columns)
    res = {"image_shape": list(image.shape[:2]), "results": {}}
    masks = {}
    for tag, path in study["results"].items():
        mask = load(path)
        masks[tag] = mask
        values = sorted(int(v) for v in np.unique(mask))
        res["results"][tag] = {"shape": list(mask.shape), "dtype": str(mask.dtype), "values": values[:10],
                               "lesion_pixels": int((mask == 1).sum())}
    if "prompt_a" in masks and "prompt_b" in masks and masks["prompt_a"].shape == masks["prompt_b"].shape:
        res["pixels_differing_a_b"] = int((masks["prompt_a"] != masks["prompt_b"]).sum())
    own = study.get("bundle_mask_prompt_a")
    if own and "prompt_a" in masks:
        own = load(own) > 0  # the bundle's own PNG mask: rows, columns of the displayed image
        shown = masks["prompt_a"].T if study["image"].endswith((".nii", ".nii.gz")) else masks["prompt_a"]
        same = own.shape == shown.shape
        res["bundle_mask_prompt_a"] = {"lesion_pixels": int(own.sum()), "same_shape": same,
                                       "pixels_differing": int((own != (shown == 1)).sum()) if same else None}
    out[study["id"]] = res
print(json.dumps(out))
"""


def log(message: str) -> None:
    print(f"[monailabel_e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], logfile: Path, cwd: Path | None = None, env: dict | None = None, timeout: float = 3600) -> str:
    """Run ``cmd``; output to ``logfile``; raise with the log's tail on failure. Returns stdout+stderr."""
    log("$ " + " ".join(shlex.quote(c) if "\n" not in c else "'<inline code>'" for c in cmd))
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    text = logfile.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}); log {logfile}:\n{text[-3000:]}")
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(venv: Path | None = None) -> dict:
    """The environment of child processes: offline, one thread, no PYTHONPATH; ``venv`` activated if given (the
    ``monailabel`` command is a shell script that runs ``python`` from ``PATH`` or ``MONAILABEL_PYEXE``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OFFLINE_ENV)
    if venv is not None:
        env.update({"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                    "MONAILABEL_PYEXE": str(venv_python(venv))})  # fmt: skip
    return env


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def build_venv(venv: Path, logs: Path) -> None:
    run([sys.executable, "-m", "venv", str(venv)], logs / "venv.log")
    run([str(venv_python(venv)), "-m", "pip", "install", MONAILABEL, "-e", str(REPO)], logs / "pip_install.log",
        env=child_env(), timeout=7200)  # fmt: skip


def venv_versions(venv: Path, logs: Path) -> dict:
    code = (
        "import json, importlib.metadata as m, sys\n"
        "names = ['monailabel', 'monai', 'torch', 'numpy', 'pydicom', 'pydicom-seg', 'transformers', 'himix-monai']\n"
        "print(json.dumps({'python': sys.version.split()[0], **{n: m.version(n) for n in names}}))"
    )
    out = run([str(venv_python(venv)), "-c", code], logs / "versions.log", env=child_env())
    versions = json.loads(out.strip().splitlines()[-1])
    where = run([str(venv_python(venv)), "-c", "import himix_monai; print(himix_monai.__file__)"], logs / "where.log",
                cwd=Path(tempfile.gettempdir()), env=child_env()).strip().splitlines()[-1]  # fmt: skip
    if not versions["monailabel"] == "0.8.5":
        raise RuntimeError(f"{venv}: monailabel {versions['monailabel']}, expected 0.8.5")
    if int(versions["pydicom"].split(".")[0]) >= 3:
        raise RuntimeError(f"{venv}: pydicom {versions['pydicom']}; MONAI Label's pydicom-seg needs pydicom<3")
    versions["himix_monai_path"] = where
    return versions


def train_model(venv: Path, work: Path, logs: Path, epochs: int, cases: int, size: int) -> Path:
    root = work / "train_bundle"
    run(
        [str(venv_python(venv)), "-m", "monai.bundle", "run", "training",
         "--config_file", str(REPO / "bundle" / "configs" / "train.json"), "--bundle_root", str(root),
         "--epochs", str(epochs), "--image_size", f"[{size},{size}]", "--demo_num_cases", str(cases),
         "--demo_decoys", "true", "--batch_size", "4"],
        logs / "train.log", cwd=work, env=child_env(), timeout=7200,
    )  # fmt: skip
    model = root / "models" / "model.pt"
    if not model.is_file():
        raise RuntimeError(f"training wrote no {model}; see {logs / 'train.log'}")
    return model


def swap_sides(report: str) -> str:
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", report)


def make_studies(venv: Path, work: Path, logs: Path, num: int) -> tuple[Path, dict[str, Path], dict[str, tuple]]:
    """Demo cases with decoys (NIfTI) and one non-square PNG picture (a windowed, cropped demo slice), and the two
    prompts of each."""
    demo = work / "demo_source"
    run([str(venv_python(venv)), "-m", "data_prep.demo", "--out", str(demo), "--num", str(num), "--seed", "7",
         "--size", "128", "--decoys"], logs / "demo.log", cwd=REPO, env=child_env())  # fmt: skip
    studies = work / "studies"
    studies.mkdir()
    images, prompts = {}, {}
    datalist = json.loads((demo / "datalist.json").read_text())
    items = [item for split in ("training", "validation", "test") for item in datalist[split]]
    reports = {Path(item["image"]).name: item["text"] for item in items}
    for path in sorted((demo / "images").glob("*.nii.gz")):
        shutil.copy2(path, studies / path.name)
        image_id = path.name[: -len(".nii.gz")]
        images[image_id] = studies / path.name
        prompts[image_id] = (reports[path.name], swap_sides(reports[path.name]))
    first = next(iter(images.values()))
    picture = studies / "picture_rect.png"
    code = (
        "import sys, numpy as np, nibabel as nib\nfrom PIL import Image\n"
        "hu = np.asarray(nib.load(sys.argv[1]).dataobj).T.astype(np.float32)  # MONAI layout -> rows, columns\n"
        "grey = np.clip((hu + 1000.0) / 1400.0 * 255.0, 0, 255).astype(np.uint8)[:, 16:112]\n"
        "Image.fromarray(grey).save(sys.argv[2])\n"
    )
    run([str(venv_python(venv)), "-c", code, str(first), str(picture)], logs / "picture.log", env=child_env())
    images["picture_rect"] = picture
    prompts["picture_rect"] = (PROMPT_A, PROMPT_B)
    return studies, images, prompts


def install_app(venv: Path, work: Path, logs: Path, name: str, model: Path) -> Path:
    apps = work / "apps"
    run([str(venv / "bin" / "monailabel"), "apps", "--download", "--name", "monaibundle", "--output", str(apps)],
        logs / "apps.log", cwd=work, env=child_env(venv))  # fmt: skip
    app = apps / "monaibundle"
    target = app / "model" / name
    ignore = shutil.ignore_patterns("models", "data", "eval", "logs", "__pycache__")
    shutil.copytree(REPO / "bundle", target, ignore=ignore)
    (target / "models").mkdir()
    shutil.copy2(model, target / "models" / "model.pt")
    return app


def bundle_inference(venv: Path, work: Path, logs: Path, bundle: Path, images: dict[str, Path], prompts: dict) -> dict:
    """The bundle's own file-writing inference (PNG masks) on copies of the studies, with their prompt A
    (``texts.csv``)."""
    inputs = work / "bundle_inputs"
    inputs.mkdir()
    with open(inputs / "texts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image", "Description"])
        for image_id, path in images.items():
            shutil.copy2(path, inputs / path.name)
            writer.writerow([path.name, prompts[image_id][0]])
    out = work / "bundle_eval_prompt_a"
    run([str(venv_python(venv)), "-m", "monai.bundle", "run",
         "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
         "--input_dir", str(inputs), "--output_dir", str(out), "--save_overlays", "false"], logs / "bundle_inference.log", cwd=work, env=child_env(venv))  # fmt: skip
    masks = {}
    for image_id, path in images.items():
        mask = out / "masks" / f"{image_id}_mask.png"
        if not mask.is_file():
            raise RuntimeError(f"the bundle's inference wrote no {mask}; see {logs / 'bundle_inference.log'}")
        masks[image_id] = mask
    return masks


def http(method: str, url: str, data: bytes | None = None, timeout: float = 600) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def wait_for_info(base: str, proc: subprocess.Popen, server_log: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = server_log.read_text()[-4000:]
            raise RuntimeError(f"server exited ({proc.returncode}); log {server_log}:\n{tail}")
        try:
            status, body, _ = http("GET", f"{base}/info/", timeout=10)
            if status == 200:
                return json.loads(body)
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            pass
        time.sleep(3)
    raise RuntimeError(f"no /info/ within {timeout:.0f} s; log {server_log}:\n{server_log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM to the server's process group (then SIGKILL after 30 s). Returns how it ended."""
    if proc.poll() is not None:
        return f"already exited ({proc.returncode})"
    pgid = os.getpgid(proc.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
        how = f"SIGTERM to process group {pgid}"
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=30)
        how = f"SIGKILL to process group {pgid}"
    try:
        os.killpg(pgid, 0)
        return how + "; group still alive"
    except ProcessLookupError:
        return how + "; group gone"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--venv", type=Path, help="reuse this virtual environment (monailabel 0.8.5 + the project)")
    parser.add_argument("--model", type=Path, help="a trained models/model.pt of this bundle (default: train one)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--train-cases", type=int, default=96, help="demo cases with decoys for training (default 96)")
    parser.add_argument("--train-size", type=int, default=128,
                        help="training image size (default 128, inference.json's image_size, which MONAI Label uses)")
    parser.add_argument("--studies", type=int, default=3, help="demo cases given to the server (default 3)")
    parser.add_argument("--name", default="himix", help="model name in the app (default himix)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for /info/ (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder of a temporary run")
    args = parser.parse_args(argv)

    work = (args.work or Path(tempfile.mkdtemp(prefix="himix_monailabel_e2e_"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()) and args.work:
        for sub in ("studies", "apps", "train_bundle", "demo_source", "results"):
            if (work / sub).exists():
                parser.error(f"{work / sub} exists; give an empty or new --work folder")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    summary: dict = {
        "check": "monailabel_e2e",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPU, {platform.platform()}",
        "work": str(work),
        "server_conf": {"models": args.name, "zoo_source": "github", "sam2": "false"},
    }
    proc = None
    try:
        venv = args.venv.absolute() if args.venv else work / "venv"
        if not args.venv:
            build_venv(venv, logs)
        summary["venv"] = {"path": str(venv), "reused": bool(args.venv), **venv_versions(venv, logs)}

        t_train = time.monotonic()
        if args.model:
            model, trained = args.model.absolute(), None
        else:
            model = train_model(venv, work, logs, args.epochs, args.train_cases, args.train_size)
            trained = {"epochs": args.epochs, "cases": args.train_cases, "image_size": args.train_size, "decoys": True,
                       "seconds": round(time.monotonic() - t_train, 1)}  # fmt: skip
        summary["model"] = {"path": str(model), "size_bytes": model.stat().st_size, "trained_here": trained}
        studies, images, prompts = make_studies(venv, work, logs, args.studies)
        summary["prompts"] = {key: {"prompt_a": a, "prompt_b": b, "none": None} for key, (a, b) in prompts.items()}
        app = install_app(venv, work, logs, args.name, model)

        port = args.port or free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [str(venv / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies),
               "--conf", "models", args.name, "--conf", "zoo_source", "github", "--conf", "sam2", "false",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        summary["server_command"] = shlex.join(cmd)
        server_log = logs / "server.log"
        log("$ " + shlex.join(cmd))
        with open(server_log, "w") as f:
            proc = subprocess.Popen(
                cmd, cwd=work, env=child_env(venv), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        summary["server_pid"] = proc.pid
        t0 = time.monotonic()
        info = wait_for_info(base, proc, server_log, args.start_timeout)
        summary["server_start_s"] = round(time.monotonic() - t0, 1)
        model_info = info.get("models", {}).get(args.name)
        if model_info is None:
            raise RuntimeError(f"/info/ does not list {args.name}: {sorted(info.get('models', {}))}")
        summary["info"] = {k: model_info.get(k) for k in ("type", "labels", "dimension", "version")}
        summary["info"]["config_text_prompt"] = model_info.get("config", {}).get("text_prompt")

        results = work / "results"
        results.mkdir()
        requests = []
        for image_id, image_path in images.items():
            study = {"id": image_id, "image": str(image_path), "results": {}, "http": {}}
            for tag, prompt in (("prompt_a", prompts[image_id][0]), ("prompt_b", prompts[image_id][1]), ("none", None)):
                params = {} if prompt is None else {"text_prompt": prompt}
                query = urllib.parse.urlencode({"image": image_id, "output": "image"})
                body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
                t1 = time.monotonic()
                status, content, headers = http("POST", f"{base}/infer/{args.name}?{query}", body)
                study["http"][tag] = {"status": status, "seconds": round(time.monotonic() - t1, 1)}
                if status != 200:
                    what = f"POST /infer/{args.name} image={image_id} {tag}"
                    raise RuntimeError(f"{what}: HTTP {status} {content[:500]!r}")
                disposition = headers.get("content-disposition", headers.get("Content-Disposition", ""))
                suffix = ".png" if image_path.suffix == ".png" else ".nii.gz"
                if "filename=" in disposition:
                    filename = disposition.split("filename=")[-1].strip('"; ')
                    suffix = ".nii.gz" if filename.endswith(".nii.gz") else Path(filename).suffix or suffix
                out = results / f"{image_id}_{tag}{suffix}"
                out.write_bytes(content)
                study["results"][tag] = str(out)
            requests.append(study)

        summary["server_stop"] = stop_server(proc)
        proc = None
        own = bundle_inference(venv, work, logs, app / "model" / args.name, images, prompts)
        for study in requests:
            study["bundle_mask_prompt_a"] = str(own[study["id"]])
        (logs / "inspect_request.json").write_text(json.dumps({"studies": requests}, indent=1))
        inspect = subprocess.run([str(venv_python(venv)), "-c", INSPECT], input=json.dumps({"studies": requests}),
                                 capture_output=True, text=True, env=child_env(), timeout=600)  # fmt: skip
        if inspect.returncode != 0:
            raise RuntimeError(f"reading the returned files failed:\n{inspect.stderr[-3000:]}")
        inspected = json.loads(inspect.stdout.strip().splitlines()[-1])
        checks = {"shapes_equal_images": True, "integer_dtype": True, "labels_in_channel_def": True}
        per_image = {}
        for study in requests:
            found = inspected[study["id"]]
            for tag, res in found["results"].items():
                res["http"] = study["http"][tag]
                checks["shapes_equal_images"] &= res["shape"] == found["image_shape"]
                checks["integer_dtype"] &= "int" in res["dtype"]
                checks["labels_in_channel_def"] &= set(res["values"]) <= {0, 1}
            per_image[study["id"]] = found
        differing = {k: v.get("pixels_differing_a_b", 0) for k, v in per_image.items()}
        checks["same_as_bundle_own_mask_prompt_a"] = all(
            v["bundle_mask_prompt_a"]["pixels_differing"] == 0 for v in per_image.values()
        )
        checks["prompts_change_masks"] = any(n > 0 for k, n in differing.items() if k != "picture_rect")
        checks["listed_with_text_prompt"] = summary["info"]["config_text_prompt"] == ""
        checks["labels_lesion_1"] = summary["info"]["labels"] == {"lesion": 1}
        checks["dimension_2"] = summary["info"]["dimension"] == 2
        summary["per_image"] = per_image
        summary["pixels_differing_prompt_a_b"] = differing
        summary["checks"] = checks
        summary["ok"] = all(checks.values())
    except Exception as err:  # noqa: BLE001 - reported in the JSON line
        summary["ok"] = False
        summary["error"] = f"{type(err).__name__}: {err}"[-4000:]
    finally:
        if proc is not None:
            summary["server_stop"] = stop_server(proc)
        summary["seconds"] = round(time.monotonic() - started, 1)
        if not args.work and not args.keep and summary.get("ok"):
            shutil.rmtree(work, ignore_errors=True)
            summary["work"] += " (removed)"
    print(json.dumps(summary))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
