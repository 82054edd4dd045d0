"""A real ComfyUI server for the integration tests: started from the source tree in COMFYUI_PATH with a fresh
--base-directory that holds this pack (and the test-only probe nodes) under custom_nodes and the demo models, on
loopback only, stopped by PID.

Every HTTP request and every wait has a timeout, so a hung server fails a test instead of hanging the run.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import websocket  # websocket-client

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "vqcore-nodes"
PROBES_FOLDER = "integration_probes"  # test-only nodes (probe_nodes/), installed beside the pack
HOST = "127.0.0.1"
REQUEST_TIMEOUT = 30
# Loopback only: never route the test's requests through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
STARTUP_TIMEOUT = 180

# Beside a CPU-only torch, PyPI's torchvision cannot load its C++ ops and then fails at import on its op
# schemas. ComfyUI only needs torchvision importable (its Python models), so when the ops library does not
# load, the two schemas torchvision registers fake kernels for are defined here, before it is imported.
TORCHVISION_HOOK = '''
import glob, importlib.util, os
_spec = importlib.util.find_spec("torchvision")
if _spec is not None:
    import torch
    _libs = glob.glob(os.path.join(os.path.dirname(_spec.origin), "_C*.so"))
    try:
        torch.ops.load_library(_libs[0])
    except (IndexError, OSError, RuntimeError):
        _torchvision_schemas = torch.library.Library("torchvision", "DEF")
        for _op in ("nms", "qnms"):
            _torchvision_schemas.define(_op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
'''


def comfyui_path():
    """The ComfyUI source tree named by COMFYUI_PATH, or None when unset or not a ComfyUI checkout."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None
    path = Path(path)
    return path if (path / "main.py").is_file() and (path / "comfy").is_dir() else None


def comfyui_version(comfy_dir: Path) -> str:
    """The tree's version as its comfyui_version.py states it ("unknown" where the file is missing)."""
    text = (comfy_dir / "comfyui_version.py").read_text() if (comfy_dir / "comfyui_version.py").is_file() else ""
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return match.group(1) if match else "unknown"


def comfyui_python() -> str:
    """The interpreter for ComfyUI: COMFYUI_PYTHON (the environment setup_comfyui.sh made), else ours."""
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class RequestError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class ComfyServer:
    def __init__(self, comfy_dir: Path, base_dir: Path):
        self.comfy_dir = comfy_dir
        self.base_dir = base_dir
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = base_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.process = None

    # --- lifecycle -------------------------------------------------------------------------------------

    def prepare(self):
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        (custom_nodes / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
        (custom_nodes / PROBES_FOLDER).symlink_to(Path(__file__).parent / "probe_nodes", target_is_directory=True)
        models = self.base_dir / "models"
        models.mkdir(exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "vqcore", "demo-models", str(models)], cwd=REPO_ROOT,
                              check=False, timeout=600, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"python -m vqcore demo-models failed:\n{done.stderr[-4000:]}")
        hook_dir = self.base_dir / "python_hooks"
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(TORCHVISION_HOOK)

    def start(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.base_dir / "python_hooks"), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        command = [comfyui_python(), "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
                   "--disable-auto-launch", "--base-directory", str(self.base_dir),
                   "--database-url", "sqlite:///:memory:", "--log-stdout",
                   # previews on, as most users run: the browser test checks our panels stay clear of them
                   "--preview-method", "auto"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.comfy_dir, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} during startup:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info", timeout=5)
                return
            except (OSError, RequestError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {STARTUP_TIMEOUT} s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP ------------------------------------------------------------------------------------------

    def request(self, method, path, payload=None, timeout=REQUEST_TIMEOUT):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with OPENER.open(req, timeout=timeout) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            body, status = error.read(), error.code
        text = body.decode(errors="replace")
        try:
            parsed = json.loads(text) if text else None
        except json.JSONDecodeError:
            parsed = text
        if status >= 400:
            raise RequestError(status, parsed)
        return parsed

    def get(self, path, timeout=REQUEST_TIMEOUT):
        return self.request("GET", path, timeout=timeout)

    def post(self, path, payload=None, timeout=REQUEST_TIMEOUT):
        return self.request("POST", path, payload if payload is not None else {}, timeout=timeout)

    def queue_prompt(self, prompt: dict, workflow: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        return self.post("/prompt", body)["prompt_id"]

    def wait_for_history(self, prompt_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited while running {prompt_id}:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run_prompt(self, prompt: dict, timeout: float = 300, workflow: dict | None = None) -> dict:
        return self.wait_for_history(self.queue_prompt(prompt, workflow), timeout)

    def clear_cache(self):
        """Empties the host's output cache, so that the next prompt runs every node. POST /free only sets a flag
        that the worker reads after its current prompt or when it wakes idle; it always reads it before taking
        the next prompt, so once one more prompt has finished the flag has been acted on."""
        self.post("/free", {"free_memory": True})
        self.run_prompt({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                      "color": 0}},
                         "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, timeout=60)

    def websocket(self, timeout=REQUEST_TIMEOUT):
        """Socket receiving this client's execution events (JSON frames decoded; binary previews skipped)."""
        return EventSocket(f"ws://{HOST}:{self.port}/ws?clientId={self.client_id}", timeout)


class EventSocket:
    def __init__(self, url, timeout):
        self.ws = websocket.create_connection(url, timeout=timeout)

    def next_event(self, deadline: float) -> dict:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no websocket event before the deadline")
            self.ws.settimeout(remaining)
            frame = self.ws.recv()
            if isinstance(frame, str):
                return json.loads(frame)

    def close(self):
        self.ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
