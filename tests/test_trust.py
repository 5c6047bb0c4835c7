"""Nothing read from storage or the network runs code: a pickle planted as a sweep's ASHA state, or served as backbone
weights (plain http from a server on 127.0.0.1, https from one with a certificate of the test's own, a local file),
is refused with one line and never unpickled. Each planted pickle opens a marker file when unpickled: the test first
shows that it does (a copy aimed at another marker), then that ddetr never creates the marker."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io as _io
import json
import pickle
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ddetr import cli
from ddetr.config import ConfigError
from ddetr.data.synthetic import make_synthetic_coco
from ddetr.models.backbone import Backbone, load_imagenet_weights

REPO = Path(__file__).resolve().parents[1]
TEST_SPACE = REPO / "tests" / "data" / "asha_space.yaml"
RUN = ["data.scale=0.1", "data.loader_workers=0", "train.epochs=1", "train.max_steps_per_epoch=1",
       "train.log_every=1000"]  # fmt: skip


class PlantedCode:
    """Unpickled, it opens (creates) `marker`: what an attacker's pickle would do with a command instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_pickle(marker: Path) -> bytes:
    """A plain pickle that creates `marker` when loaded; shown to do so on a copy aimed at `marker`.control."""
    control = marker.with_name(marker.name + ".control")
    pickle.loads(pickle.dumps(PlantedCode(control))).close()
    assert control.exists(), "the planted pickle does not run its code: the test would prove nothing"
    return pickle.dumps(PlantedCode(marker))


def planted_weights(marker: Path) -> bytes:
    """A torch.save file of a state dict whose one entry creates `marker` when loaded (checked on a copy)."""

    def saved(target: Path) -> bytes:
        buffer = _io.BytesIO()
        torch.save({"conv1.weight": PlantedCode(target)}, buffer)
        return buffer.getvalue()

    control = marker.with_name(marker.name + ".control")
    torch.load(_io.BytesIO(saved(control)), weights_only=False)
    assert control.exists(), "the planted weights do not run their code: the test would prove nothing"
    return saved(marker)


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


# ---- a sweep's ASHA state ------------------------------------------------------------------------------------------


def test_a_pickle_planted_as_the_sweeps_asha_state_never_runs(tmp_path: Path, capsys) -> None:
    import ray

    from ddetr.sweep.asha import LEGACY_STATE_FILE, STATE_FILE, ResumableASHA

    marker = tmp_path / "pwned"
    payload = planted_pickle(marker)
    sweep = tmp_path / "tune" / "sweep"
    sweep.mkdir(parents=True)
    (sweep / LEGACY_STATE_FILE).write_bytes(payload)
    argv = ["tune", "--data", str(tmp_path / "data"), "--space", str(TEST_SPACE), "--name", "sweep", "--storage",
            str(tmp_path / "tune")]  # fmt: skip
    ray_before = ray.is_initialized()  # the suite's own Ray may be up already
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert f"{sweep / LEGACY_STATE_FILE}: ASHA state saved as a pickle, which ddetr never loads" in line
    assert ray.is_initialized() == ray_before  # refused before any Ray starts

    def scheduler() -> ResumableASHA:
        return ResumableASHA(sweep / STATE_FILE, time_attr="epoch", metric="val/AP", mode="max", max_t=2)

    trial = type("Trial", (), {"trial_id": "t"})()
    with pytest.raises(ConfigError, match="never loads"):  # the scheduler refuses it too (a sweep restored by Tune)
        scheduler().on_trial_add(None, trial)
    (sweep / LEGACY_STATE_FILE).unlink()
    (sweep / STATE_FILE).write_bytes(payload)  # the same pickle under the JSON name
    with pytest.raises(ConfigError, match=f"{sweep / STATE_FILE}: not JSON"):
        scheduler().on_trial_add(None, trial)
    assert not marker.exists()


def test_asha_state_is_json_and_refuses_another_sweeps_rungs(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from ddetr.sweep.asha import ResumableASHA

    def scheduler(max_t: int = 4) -> ResumableASHA:
        return ResumableASHA(
            tmp_path / "asha_state.json", time_attr="epoch", metric="val/AP", mode="max", max_t=max_t,
            grace_period=1, reduction_factor=2,
        )  # fmt: skip

    first = scheduler()
    for trial_id, ap in (("a", 0.5), ("b", 0.6)):
        first.on_trial_add(None, SimpleNamespace(trial_id=trial_id))
        result = first.on_trial_result(None, SimpleNamespace(trial_id=trial_id), {"epoch": 1, "val/AP": ap})
        assert result == TrialScheduler.CONTINUE
    state = json.loads((tmp_path / "asha_state.json").read_text())
    assert state["brackets"][0]["rungs"][-1] == {"milestone": 1, "recorded": {"a": 0.5, "b": 0.6}}
    assert state["trials"] == {"a": 0, "b": 0}
    again = scheduler()
    again.on_trial_add(None, SimpleNamespace(trial_id="c"))
    behind = again.on_trial_result(None, SimpleNamespace(trial_id="c"), {"epoch": 1, "val/AP": 0.1})
    assert behind == TrialScheduler.STOP
    # "b" was running when the sweep stopped: its next result finds its bracket.
    ahead = again.on_trial_result(None, SimpleNamespace(trial_id="b"), {"epoch": 2, "val/AP": 0.7})
    assert ahead == TrialScheduler.CONTINUE
    with pytest.raises(ConfigError, match=r"asha_state.json: not ASHA state of this sweep \(bracket 0 has rungs at"):
        scheduler(max_t=16).on_trial_add(None, SimpleNamespace(trial_id="d"))


# ---- backbone weights ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(files: dict[str, bytes], tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, list[str]]]:
    """An HTTP(S) server on 127.0.0.1 serving `files` by path: yields (base URL, paths requested so far)."""
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requested.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("trust_data")
    make_synthetic_coco(str(root), 4, 0, seed=0, image_size=(64, 96))
    return str(root)


def test_a_backbone_url_over_plain_http_is_refused_before_any_request(tmp_path: Path, data: str, capsys) -> None:
    marker = tmp_path / "pwned"
    with serve({"/resnet18-f37072fd.pth": planted_weights(marker)}) as (base, requested):
        url = f"{base}/resnet18-f37072fd.pth"
        argv = ["train", "--engine", "local", "--preset", "tiny", "--data", data, *RUN,
                f"train.storage_path={tmp_path / 'runs'}", f"model.pretrained_backbone={url}"]  # fmt: skip
        assert cli.main(argv) == 2
        assert requested == []
    line = one_error_line(capsys)
    assert line.startswith(f"error: model.pretrained_backbone={url}: only https:// URLs are fetched")
    assert not marker.exists()


def test_a_pickle_as_backbone_weights_in_a_local_file_never_runs(tmp_path: Path, data: str, capsys) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(planted_weights(marker))
    argv = ["train", "--engine", "local", "--preset", "tiny", "--data", data, *RUN,
            f"train.storage_path={tmp_path / 'runs'}", f"model.pretrained_backbone={weights}"]  # fmt: skip
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert f"refused {weights}: it pickles objects other than tensors and containers" in line
    assert "io.open" in line  # what it would have called
    assert not marker.exists()


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 made here, trusted by this process's HTTPS clients
    (SSL_CERT_FILE), and torch's download cache in the test's folder."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days",
         "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_https_weights_are_hash_checked_and_loaded_without_unpickling(tmp_path: Path, tls: ssl.SSLContext) -> None:
    marker = tmp_path / "pwned"
    planted = planted_weights(marker)
    good_body = Backbone("resnet18", True, False).body
    buffer = _io.BytesIO()
    torch.save(good_body.state_dict(), buffer)
    good = buffer.getvalue()

    def named(body: bytes) -> str:  # torchvision's naming: the first 8 hex digits of the file's sha256
        return f"/resnet18-{hashlib.sha256(body).hexdigest()[:8]}.pth"

    files = {named(good): good, named(planted): planted, "/resnet18-00000000.pth": planted}
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    with serve(files, tls) as (base, requested):
        body = Backbone("resnet18", True, False).body
        load_imagenet_weights(body, f"{base}{named(good)}", "resnet18")  # downloaded, checked, loaded
        for k, v in good_body.state_dict().items():
            torch.testing.assert_close(body.state_dict()[k], v)

        with pytest.raises(ConfigError, match="pickles objects other than tensors and containers") as e:
            load_imagenet_weights(body, f"{base}{named(planted)}", "resnet18")  # its hash is right: it is read
        assert "\n" not in str(e.value) and not marker.exists()

        with pytest.raises(ConfigError, match=r"the file's sha256 starts [0-9a-f]{8}, its name says 00000000"):
            load_imagenet_weights(body, f"{base}/resnet18-00000000.pth", "resnet18")
        assert not (cache / "resnet18-00000000.pth").exists()  # a file that failed its check is not kept

        load_imagenet_weights(body, f"{base}{named(good)}", "resnet18")  # from the cache: no second request
        assert requested == [named(good), named(planted), "/resnet18-00000000.pth"]
    (cache / named(good).lstrip("/")).write_bytes(planted)  # a cached copy changed on disk: checked again
    with pytest.raises(ConfigError, match="not the file the URL names"):
        load_imagenet_weights(body, f"{base}{named(good)}", "resnet18")
    assert not marker.exists()
