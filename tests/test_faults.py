"""Fault injection: storage faults, malformed command lines, signals. Every case asserts its exact outcome:

* ``refused``   - exit status 2 and exactly one line on stderr, ``error: ...`` naming the problem;
* ``recovered`` - rerunning the same ``delsketch sketch`` command repairs the sketch to the bytes of a clean
  build (saying so in one ``warning:`` line where a file had to be recomputed);
* ``harmless``  - the command succeeds and its result equals the undamaged one.

The counts per kind and outcome are collected while the cases run; with ``DELSKETCH_FAULT_REPORT=path`` they are
written there as JSON (``python bench/faults_report.py`` runs this file and prints them; docs/reliability.md
quotes them). One tiny digits sketch (6 directions, degree 2, 3 steps) is built per module and copied per case.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from delsketch.apps.cli import main
from delsketch.io import directory_lock

SKETCH = ["sketch", "--preset", "digits", "--steps", "3", "--degree", "2", "--chunk", "2", "--seed", "5"]
M = 6
PREDICT = ["--method", "sketch", "--delete", "0:3,40", "--query", "test:1", "--json"]  # the sketch itself, deterministic
REPO = Path(__file__).resolve().parents[1]

RESULTS: list[dict] = []


def note(kind: str, case: str, outcome: str) -> None:
    RESULTS.append({"kind": kind, "case": case, "outcome": outcome})


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    counts: dict = {}
    for r in RESULTS:
        c = counts.setdefault(r["kind"], collections.Counter())
        c["tried"] += 1
        c[r["outcome"]] += 1
    total = sum((c for c in counts.values()), collections.Counter())
    summary = {"by_kind": {k: dict(v) for k, v in sorted(counts.items())}, "total": dict(total), "cases": RESULTS}
    path = os.environ.get("DELSKETCH_FAULT_REPORT")
    if path:
        Path(path).write_text(json.dumps(summary, indent=1) + "\n")


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def sketch_files(d: Path) -> dict[str, bytes]:
    """The files a sketch consists of (timings.json holds wall times and is not compared)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name == "manifest.json")}


def assert_refused(rc, err, needle):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "clean"
    assert main([*SKETCH, "--directions", str(M), "--out", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def clean_prediction(clean):
    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["predict", str(clean), *PREDICT]) == 0
    return json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """The same sketch with another seed: valid files holding the wrong directions."""
    d = tmp_path_factory.mktemp("faults") / "other"
    args = [a if a != "5" else "6" for a in SKETCH]
    assert main([*args, "--directions", str(M), "--out", str(d)]) == 0
    return d


# ----------------------------------------------------------------------------------------------
# damage
# ----------------------------------------------------------------------------------------------

C0, C1, C2 = (f"chunk-0000{i}.safetensors" for i in range(3))
BASE, MAN = "base.safetensors", "manifest.json"


def flip(name, where):
    def f(d, ctx):
        p = d / name
        b = bytearray(p.read_bytes())
        i = {"middle": len(b) // 2, "last": len(b) - 1, "header": 40}[where]
        b[i] ^= 0x01
        p.write_bytes(bytes(b))
    return f


def truncate(name, frac):
    def f(d, ctx):
        p = d / name
        p.write_bytes(p.read_bytes()[: int(len(p.read_bytes()) * frac)])
    return f


def delete(name):
    return lambda d, ctx: (d / name).unlink()


def make_dir(name):
    def f(d, ctx):
        (d / name).unlink()
        (d / name).mkdir()
    return f


def write(name, data: bytes):
    return lambda d, ctx: (d / name).write_bytes(data)


def swap(a, b):
    def f(d, ctx):
        pa, pb = d / a, d / b
        ba, bb = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(bb)
        pb.write_bytes(ba)
    return f


def pickle_payload(name):
    def f(d, ctx):
        t = {k: v.clone() for k, v in load_file(d / name).items()}  # (load_file maps the file: copy first)
        torch.save(t, d / name)  # a pickle where a safetensors file belongs
    return f


def from_other(name):
    return lambda d, ctx: shutil.copy(ctx["other"] / name, d / name)


def edit(fn):
    def f(d, ctx):
        man = json.loads((d / MAN).read_text())
        fn(man)
        (d / MAN).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    return f


def unrecord(name, then=None):
    """Drop the manifest record of a chunk (as if it had been computed elsewhere and copied in)."""
    def f(d, ctx):
        edit(lambda m: m["chunks"].pop(name))(d, ctx)
        if then is not None:
            then(d, ctx)
    return f


def strip_digest(name):
    def f(d, ctx):
        t = {k: v.clone() for k, v in load_file(d / name).items()}
        save_file(t, d / name, metadata={"delsketch": json.dumps({"format": "delsketch-sketch/1"})})
    return f


def rename_tensor(name, old, new):
    """Rewrite a chunk with a tensor renamed and record the new file's checksum: intact bytes, wrong contents."""
    def f(d, ctx):
        from delsketch.io import sha256_file

        t = {(new if k == old else k): v.clone() for k, v in load_file(d / name).items()}
        save_file(t, d / name)
        edit(lambda m: m["chunks"][name].update(sha256=sha256_file(d / name)))(d, ctx)
    return f


def chain(*fs):
    def f(d, ctx):
        for g in fs:
            g(d, ctx)
    return f


def hold_lock_in_a_dead_process(d, ctx):
    """A holder that is killed with SIGKILL: the kernel releases its flock, the file stays behind."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(d / ".lock")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    p.kill()
    p.wait()
    assert (d / ".lock").exists()


R = "refused"
OK = "harmless"


def rec(needle=None):
    return ("recovered", needle)


CHECKSUM = "checksum mismatch"
RECOMPUTED = "differ from the checksum in the manifest: recomputing"
UNPROVEN = "does not prove itself intact"

# (id, damage, outcome of `predict` on the damaged sketch, outcome of rerunning `sketch` on it)
# an outcome is "harmless", (refused, needle in the error line) or (recovered, needle in a warning line or None);
# None: not applicable (the sketch is knowingly incomplete)
STORAGE = [
    ("chunk: one bit flipped in the parameter data", flip(C1, "middle"), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: lowest bit of the last byte flipped", flip(C1, "last"), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: one bit flipped in the header", flip(C1, "header"), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: truncated to half", truncate(C2, 0.5), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: truncated to 0 bytes", truncate(C0, 0), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: deleted", delete(C1), (R, "file missing"), rec("recorded chunk file is missing")),
    ("chunk: two chunks swapped", swap(C0, C1), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: replaced by a pickle", pickle_payload(C1), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: replaced by garbage", write(C1, os.urandom(5000)), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: replaced by another seed's chunk", from_other(C1), (R, CHECKSUM), rec(RECOMPUTED)),
    ("chunk: unexpected tensor name (checksum recorded)", rename_tensor(C1, "param.fc2.bias", "param.fc3.bias"),
     (R, "tensor param.fc2.bias is None"), (R, "tensor param.fc2.bias is None")),
    ("chunk: psi renamed (checksum recorded)", rename_tensor(C0, "psi", "phi"),
     (R, "tensor phi is [2, 500, 2]"), (R, "tensor phi is [2, 500, 2]")),
    ("chunk: path is a directory", make_dir(C1), (R, "not a file"), (R, "not a file")),
    ("chunk: sha256 in the manifest edited", edit(lambda m: m["chunks"][C1].update(sha256="0" * 64)), (R, CHECKSUM),
     rec(RECOMPUTED)),
    ("unrecorded chunk: intact (copied in)", unrecord(C2), None, OK),
    ("unrecorded chunk: one bit flipped", unrecord(C2, flip(C2, "middle")), None, rec(UNPROVEN)),
    ("unrecorded chunk: lowest bit flipped", unrecord(C1, flip(C1, "last")), None, rec(UNPROVEN)),
    ("unrecorded chunk: no digest inside", unrecord(C2, strip_digest(C2)), None, rec(UNPROVEN)),
    ("unrecorded chunk: another seed's chunk", unrecord(C2, from_other(C2)), None, rec(UNPROVEN)),
    ("unrecorded chunk: truncated", unrecord(C2, truncate(C2, 0.3)), None, rec(UNPROVEN)),
    ("base: one bit flipped", flip(BASE, "middle"), (R, CHECKSUM), rec("base.safetensors: missing or differs")),
    ("base: deleted", delete(BASE), (R, "file missing"), rec("base.safetensors: missing or differs")),
    ("base: truncated", truncate(BASE, 0.5), (R, CHECKSUM), rec("base.safetensors: missing or differs")),
    ("base: path is a directory", make_dir(BASE), (R, "not a file"), (R, "not a file")),
    ("manifest: not JSON", write(MAN, b"{not json"), (R, "not valid JSON"), (R, "not valid JSON")),
    ("manifest: empty", write(MAN, b""), (R, "not valid JSON"), (R, "not valid JSON")),
    ("manifest: binary garbage", write(MAN, b"\xff\xfe\x00garbage"), (R, "not valid JSON"), (R, "not valid JSON")),
    ("manifest: a JSON list", write(MAN, b"[1, 2]"), (R, "not a delsketch sketch manifest"), (R, "not a delsketch")),
    ("manifest: format edited", edit(lambda m: m.update(format="other/9")), (R, "not a delsketch"), (R, "not a delsketch")),
    ("manifest: chunks missing", edit(lambda m: m.pop("chunks")), (R, "chunks is missing"), (R, "chunks is missing")),
    ("manifest: n is a string", edit(lambda m: m.update(n="500")), (R, "n must be int"), (R, "n must be int")),
    ("manifest: n edited", edit(lambda m: m.update(n=499)), (R, "n = 499"), (R, "n differs")),
    ("manifest: config.degree edited", edit(lambda m: m["config"].update(degree=3)), (R, "the manifest implies"),
     (R, "config differs")),
    ("manifest: config.degree a string", edit(lambda m: m["config"].update(degree="2")), (R, "config.degree"),
     (R, "config.degree")),
    ("manifest: config.seed edited", edit(lambda m: m["config"].update(seed=6)), OK, (R, "config differs")),
    ("manifest: config has an extra key", edit(lambda m: m["config"].update(lr=1)), (R, "unexpected keys"),
     (R, "unexpected keys")),
    ("manifest: a chunk's count edited", edit(lambda m: m["chunks"][C1].update(count=3)), (R, "count must be 2"),
     (R, "count must be 2")),
    ("manifest: a chunk's first edited", edit(lambda m: m["chunks"][C1].update(first=3)), (R, "first must be 2"),
     (R, "first must be 2")),
    ("manifest: a chunk record has an extra key", edit(lambda m: m["chunks"][C1].update(extra=1)),
     (R, "exactly first, count and sha256"), (R, "exactly first, count and sha256")),
    ("manifest: a chunk record is a list", edit(lambda m: m["chunks"].update({C1: [2, 2]})),
     (R, "exactly first, count and sha256"), (R, "exactly first, count and sha256")),
    ("manifest: a chunk name edited", edit(lambda m: m["chunks"].update({"evil.bin": m["chunks"].pop(C1)})),
     (R, "not a chunk file name"), (R, "not a chunk file name")),
    ("manifest: a chunk beyond the directions", edit(lambda m: m["chunks"].update({"chunk-00007.safetensors": m["chunks"][C1]})),
     (R, "first must be 14"), (R, "first must be 14")),
    ("manifest: base checksum null", edit(lambda m: m.update(base=None)), (R, "base is missing"), (R, "base is missing")),
    ("manifest: fingerprint edited", edit(lambda m: m.update(fingerprint="0" * 64)), (R, "other data or another config"),
     (R, "fingerprint differs")),
    ("manifest: parameter shape edited", edit(lambda m: m["params"].update({"fc1.bias": [33]})), (R, "do not match"), rec()),
    ("manifest: task_spec removed", edit(lambda m: m.update(task_spec=None)), (R, "built from Python"), rec()),
    ("manifest: task_spec names an unknown preset", edit(lambda m: m["task_spec"].update(preset="nope")),
     (R, "unknown preset"), rec()),
    ("manifest: versions edited", edit(lambda m: m["versions"].update(torch="0.0")), OK, rec()),
    ("manifest: an unknown top-level key", edit(lambda m: m.update(comment="hi")), OK, rec()),
    ("manifest: deleted (chunks intact)", delete(MAN), (R, "no sketch here"), rec()),
    ("manifest: path is a directory", make_dir(MAN), (R, "not a file"), (R, "not a file")),
    ("stale temporary file of a killed writer", write(".chunk-00001.safetensors.x1y2.tmp", b"partial"), OK, OK),
    ("timings.json deleted", delete("timings.json"), OK, OK),
    ("timings.json garbage", write("timings.json", b"\x00\x01"), OK, OK),
    ("timings.json a JSON list", write("timings.json", b"[]"), OK, OK),
    ("timings.json is a directory", make_dir("timings.json"), OK, (R, "not a file")),
    ("an unrelated file in the sketch directory", write("notes.txt", b"mine"), OK, OK),
    ("lock file left by a SIGKILLed writer", hold_lock_in_a_dead_process, OK, OK),
]


@pytest.mark.parametrize("case", STORAGE, ids=[c[0] for c in STORAGE])
def test_storage_fault(case, clean, clean_prediction, other, fs_faults, capsys, tmp_path):
    name, damage, on_load, on_resume = case  # (fs_faults: starts the filesystem cases in the background)
    ctx = {"other": other}
    want = sketch_files(clean)
    for action, expect in (("predict", on_load), ("sketch", on_resume)):
        if expect is None:
            continue
        d = tmp_path / action
        shutil.copytree(clean, d)
        damage(d, ctx)
        if action == "predict":
            rc, out, err = cli(capsys, "predict", d, *PREDICT)
        else:
            rc, out, err = cli(capsys, *SKETCH, "--directions", M, "--out", d)
        assert "Traceback" not in err
        if expect == OK:
            assert rc == 0 and not err.strip(), (action, err)
            if action == "predict":
                assert json.loads(out) == clean_prediction
            else:
                assert sketch_files(d) == want
            note("storage", f"{name} / {action}", "harmless")
        elif expect[0] == R:
            assert_refused(rc, err, expect[1])
            note("storage", f"{name} / {action}", "refused")
        else:
            assert action == "sketch"
            assert rc == 0, err
            warnings_ = [ln for ln in err.splitlines() if ln.strip()]
            assert all(ln.startswith("warning: ") for ln in warnings_), err
            if expect[1] is not None:
                assert warnings_ and all(expect[1] in ln for ln in warnings_), err  # one line per damaged file
            assert sketch_files(d) == want
            assert not list(d.glob(".*.tmp")) and not (d / ".lock").exists()
            note("storage", f"{name} / {action}", "recovered")


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(clean, capsys, tmp_path):
    """A live holder of the directory lock (another open file description: flock conflicts even within one
    process): a second `sketch` into the directory fails in one line naming the holder's pid; readers are not
    blocked; once released, the same command runs and leaves no lock file."""
    d = tmp_path / "sk"
    shutil.copytree(clean, d)
    with directory_lock(d):
        rc, _, err = cli(capsys, *SKETCH, "--directions", M, "--out", d)
        assert_refused(rc, err, f"locked by another process (pid {os.getpid()})")
        note("storage", "lock held by a live writer / sketch", "refused")
        rc, _, err = cli(capsys, "predict", d, *PREDICT)
        assert rc == 0 and not err.strip()
        note("storage", "lock held by a live writer / predict", "harmless")
    rc, _, err = cli(capsys, *SKETCH, "--directions", M, "--out", d)
    assert rc == 0 and not (d / ".lock").exists()


# ----------------------------------------------------------------------------------------------
# growing a sketch (item 6)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [3, 4])
def test_more_directions_grow_the_sketch_to_the_bytes_of_a_clean_build(clean, capsys, tmp_path, start):
    """A sketch of 3 (a partial last chunk) or 4 directions grown to 6 equals the sketch built at 6 from the
    start, byte for byte; asking for fewer directions than stored is refused in one line."""
    d = tmp_path / "sk"
    assert cli(capsys, *SKETCH, "--directions", start, "--out", d)[0] == 0
    rc, _, err = cli(capsys, *SKETCH, "--directions", M, "--out", d)
    assert rc == 0 and not err.strip(), err
    assert sketch_files(d) == sketch_files(clean)
    rc, _, err = cli(capsys, *SKETCH, "--directions", M - 1, "--out", d)
    assert_refused(rc, err, "a sketch only grows")


# ----------------------------------------------------------------------------------------------
# permissions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o027, 0o002], ids=["umask-027", "umask-002"])
def test_files_follow_the_umask(capsys, tmp_path, mask):
    old = os.umask(mask)
    try:
        d = tmp_path / "sk"
        assert cli(capsys, *SKETCH, "--directions", 2, "--out", d)[0] == 0
        png = tmp_path / "s.png"
        assert cli(capsys, "stability", d, "--query", "test:1", "--plot", png)[0] == 0
    finally:
        os.umask(old)
    files = [*d.iterdir(), png]
    assert len(files) == 5  # manifest, timings, base, one chunk, the PNG; no lock file left
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p.name, oct(p.stat().st_mode))


# ----------------------------------------------------------------------------------------------
# read-only and full filesystems (real mounts in a private mount namespace)
# ----------------------------------------------------------------------------------------------

FS_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from delsketch.apps.cli import main
    results = []
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(args)
        results.append({"rc": rc, "err": err.getvalue()})
    print(json.dumps(results))
""")


def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt || exit 1"],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def fs_faults(clean, tmp_path_factory):
    """Starts the filesystem cases in a background process (a fresh interpreter inside ``unshare -m``) as soon
    as the clean sketch exists, so they overlap the in-process cases; the test below collects them."""
    if not _unshare_available():
        yield None
        return
    tmp = tmp_path_factory.mktemp("fs")
    ro, full, tiny = tmp / "ro", tmp / "full", tmp / "tiny"
    for p in (ro, full, tiny):
        p.mkdir()
    partial = tmp / "partial"
    shutil.copytree(clean, partial)
    edit(lambda m: [m["chunks"].pop(c) for c in (C1, C2)])(partial, {})
    for c in (C1, C2):
        (partial / c).unlink()
    base_kb = sum(p.stat().st_size for p in partial.iterdir()) // 1024
    setup = (f"mount -t tmpfs -o size=16m tmpfs {ro} && cp -r {clean} {ro}/sk && cp -r {partial} {ro}/part && "
             f"mount -o remount,ro {ro} && mount -t tmpfs -o size={base_kb + 40}k tmpfs {full} && "
             f"cp -r {partial} {full}/part && mount -t tmpfs -o size=4k tmpfs {tiny}")
    cases = [
        ("read-only: resume a partial sketch / sketch", [*SKETCH, "--directions", M, "--out", f"{ro}/part"], R, "Read-only file system"),
        ("read-only: a new --out / sketch", [*SKETCH, "--directions", M, "--out", f"{ro}/new"], R, "Read-only file system"),
        ("read-only: --plot / stability", ["stability", f"{ro}/sk", "--query", "test:1", "--plot", f"{ro}/s.png"], R, "Read-only file system"),
        ("read-only: demo --out", ["demo", "--out", f"{ro}/demo"], R, "Read-only file system"),
        ("read-only: predict from a read-only sketch", ["predict", f"{ro}/sk", *PREDICT], OK, None),
        ("read-only: stability of a read-only sketch", ["stability", f"{ro}/sk", "--query", "test:1"], OK, None),
        ("disk full: resume a partial sketch / sketch", [*SKETCH, "--directions", M, "--out", f"{full}/part"], R, "No space left"),
        ("disk full: a new sketch / sketch", [*SKETCH, "--directions", M, "--out", f"{tiny}/new"], R, "No space left"),
        ("disk full: --plot / stability", ["stability", f"{ro}/sk", "--query", "test:1", "--plot", f"{tiny}/s.png"], R, "No space left"),
    ]
    check = f" && cp -r {full}/part {tmp}/after-full && ls -a {tiny}/new > {tmp}/tiny-listing"
    argv = json.dumps([[str(a) for a in c[1]] for c in cases])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "DELSKETCH_FS_SCRIPT": FS_SCRIPT, "DELSKETCH_FS_ARGS": argv}
    script = f"{setup} && {sys.executable} -c \"$DELSKETCH_FS_SCRIPT\" \"$DELSKETCH_FS_ARGS\"{check}"
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    yield {"proc": proc, "cases": cases, "tmp": tmp, "partial": partial}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_read_only_and_full_filesystems(fs_faults):
    """Real EROFS and ENOSPC: read-only and tiny tmpfs mounts inside `unshare -m` (skipped where mount
    namespaces are unavailable). Writing fails in one line with exit 2; reading a read-only sketch works;
    after ENOSPC nothing is damaged (the partial sketch is unchanged, no temporary or lock file is left)."""
    if fs_faults is None:
        pytest.skip("unshare -m with tmpfs mounts is not permitted here")
    out, err = fs_faults["proc"].communicate(timeout=300)
    assert fs_faults["proc"].returncode == 0, err[-2000:]
    results = json.loads(out.strip().splitlines()[-1])
    for (name, _, expect, needle), res in zip(fs_faults["cases"], results):
        assert "Traceback" not in res["err"], (name, res["err"])
        if expect == OK:
            assert res["rc"] == 0 and not res["err"].strip(), (name, res)
            note("storage", name, "harmless")
        else:
            assert_refused(res["rc"], res["err"], needle)
            note("storage", name, "refused")
    after, tmp = fs_faults["tmp"] / "after-full", fs_faults["tmp"]
    assert sketch_files(after) == sketch_files(fs_faults["partial"])
    assert not list(after.glob(".*")) and (tmp / "tiny-listing").read_text().split() == [".", ".."]


# ----------------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------------

SIG_ARGS = ["sketch", "--preset", "digits", "--steps", "6", "--degree", "2", "--chunk", "2", "--directions", "16"]


@pytest.fixture(scope="module")
def clean_long(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "long"
    assert main([*SIG_ARGS, "--out", str(d)]) == 0
    return d


def _cli_in_child(args: list[str], errfile: Path) -> int:
    """Run ``main(args)`` in a forked child (the CLI as one process, without paying a fresh interpreter's
    imports); its stderr goes to ``errfile``, its exit status is main's return value."""
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            sys.stdout = open(os.devnull, "w")
            sys.stderr = open(errfile, "w", buffering=1)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = main(args)
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


def test_sigterm_and_sigint_stop_the_cli_cleanly_and_the_run_resumes_to_identical_bytes(clean_long, capsys, tmp_path):
    """Two single-process `sketch` runs are stopped by SIGTERM and SIGINT once their second chunk exists: exit
    143 / 130 with one `error:` line and the resume hint, no temporary or lock file left; the same command then
    finishes, byte-identical to an uninterrupted build. (tests/test_cli.py sends SIGINT to `python -m
    delsketch.apps.cli` itself.)"""
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out, errfile = tmp_path / sig.name, tmp_path / f"{sig.name}.err"
        pid = _cli_in_child([*SIG_ARGS, "--out", str(out)], errfile)
        deadline = time.time() + 120
        while time.time() < deadline and not (out / C1).exists() and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.005)
        os.kill(pid, sig)
        _, status = os.waitpid(pid, 0)
        err = errfile.read_text()
        if os.waitstatus_to_exitcode(status) == 0:
            pytest.skip("the precompute finished before the signal arrived: make SIG_ARGS larger")
        assert os.waitstatus_to_exitcode(status) == code, (sig.name, status, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "run the same command again" in lines[0], err
        assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
        rc, _, err = cli(capsys, *SIG_ARGS, "--out", out)
        assert rc == 0 and not err.strip(), err
        assert sketch_files(out) == sketch_files(clean_long)
        note("signal", f"{sig.name} during sketch", "recovered")


# ----------------------------------------------------------------------------------------------
# malformed command lines
# ----------------------------------------------------------------------------------------------

P = ["predict", "{d}"]
S = ["sketch", "--preset", "digits", "--directions", "4", "--degree", "2", "--out", "{t}/new"]
BAD = [
    # predict: deletion SPEC
    (P + ["--delete", "0:x", "--query", "test:5"], "bad range"),
    (P + ["--delete", "99999", "--query", "test:5"], "out of range"),
    (P + ["--delete", "-1", "--query", "test:5"], "out of range"),
    (P + ["--delete", "5:5", "--query", "test:5"], "empty range"),
    (P + ["--delete", "7:3", "--query", "test:5"], "empty range"),
    (P + ["--delete", "", "--query", "test:5"], "empty --delete"),
    (P + ["--delete", " ", "--query", "test:5"], "empty --delete"),
    (P + ["--delete", "1,,2", "--query", "test:5"], "empty item"),
    (P + ["--delete", "1,", "--query", "test:5"], "empty item"),
    (P + ["--delete", "class:11", "--query", "test:5"], "class"),
    (P + ["--delete", "class:x", "--query", "test:5"], "class"),
    (P + ["--delete", "contains:x", "--query", "test:5"], "contains"),
    (P + ["--delete", "@/nonexistent/file", "--query", "test:5"], "deletion file not found"),
    (P + ["--delete", "@{t}", "--query", "test:5"], "not a file"),
    (P + ["--delete", "@{words}", "--query", "test:5"], "not an index"),
    (P + ["--delete", "@{binary}", "--query", "test:5"], "codec"),
    (P + ["--delete", "@{empty}", "--query", "test:5"], "selects no training example"),
    (P + ["--delete", "0:3000000000", "--query", "test:5"], "out of range"),
    (P + ["--delete", "-5:3", "--query", "test:5"], "out of range"),
    (P + ["--delete", "1e3", "--query", "test:5"], "bad item"),
    (P + ["--delete", "1 2", "--query", "test:5"], "bad item"),
    (P + ["--delete", "99999999999999999999999", "--query", "test:5"], "out of range"),
    (P + ["--delete", "1:2:3", "--query", "test:5"], "bad range"),
    # predict: queries and numbers
    (P + ["--delete", "1", "--query", "bogus"], "query"),
    (P + ["--delete", "1"], "at least one --query"),
    (P + ["--delete", "1", "--query", "test:100000"], "test"),
    (P + ["--delete", "1", "--query", "test:-1"], "test"),
    (P + ["--delete", "1", "--query", "train:x"], "train"),
    (P + ["--delete", "1", "--query", "test:1", "--weight", "abc"], "--weight"),
    (P + ["--delete", "1", "--query", "test:1", "--weight", "nan"], "--weight must be a finite number"),
    (P + ["--delete", "1", "--query", "test:1", "--weight", "inf"], "--weight must be a finite number"),
    (P + ["--delete", "1", "--query", "test:1", "--weight", "-inf"], "--weight must be a finite number"),
    (P + ["--delete", "1", "--query", "test:1", "--delta", "2"], "--delta"),
    (P + ["--delete", "1", "--query", "test:1", "--delta", "0"], "--delta"),
    (P + ["--delete", "1", "--query", "test:1", "--delta", "nan"], "--delta"),
    (P + ["--delete", "1", "--query", "test:1", "--delta", "-0.1"], "--delta"),
    (P + ["--delete", "1", "--query", "test:1", "--degree", "3"], "--degree"),
    (P + ["--delete", "1", "--query", "test:1", "--degree", "-1"], "--degree"),
    (P + ["--delete", "1", "--query", "test:1", "--degree", "x"], "--degree"),
    # predict: the sketch argument
    (["predict", "/nonexistent/sketch", "--delete", "1", "--query", "test:1"], "sketch directory not found"),
    (["predict", "{words}", "--delete", "1", "--query", "test:1"], "sketch directory not found"),
    (["predict", "{t}", "--delete", "1", "--query", "test:1"], "no sketch here"),
    (P + ["--query", "test:1"], "--delete"),
    (P + ["--delete", "1", "--query", "test:1", "--frobnicate"], "--frobnicate"),
    (["predict"], "SKETCH_DIR"),
    # sketch
    (["sketch", "--preset", "nope", "--directions", "2", "--degree", "2", "--out", "{t}/new"], "unknown preset"),
    ([*S[:4], "0", *S[5:]], "directions must be at least 1"),
    ([*S[:4], "-3", *S[5:]], "directions must be at least 1"),
    ([*S[:4], "abc", *S[5:]], "--directions"),
    ([*S[:6], "0", *S[7:]], "degree must lie in [1, 100]"),
    ([*S[:6], "101", *S[7:]], "degree must lie in [1, 100]"),
    (S + ["--chunk", "0"], "chunk must be at least 1"),
    (S + ["--seed", "-1"], "seed must be at least 0"),
    (S + ["--workers", "-1"], "--workers"),
    (S + ["--steps", "-1"], "steps"),
    (S + ["--steps", "100000"], "steps"),
    (S + ["--data", "/nonexistent.txt"], "data file not found"),
    ([*S[:-1], "{words}"], "is not a directory"),
    ([*S[:-1], "{d}"], "different sketch"),
    (["sketch", "--preset", "digits", "--steps", "3", "--degree", "2", "--chunk", "2", "--seed", "5", "--directions", "4", "--out", "{d}"],
     "a sketch only grows"),
    (S[:-2], "--out"),
    # series, retrain, influence
    (["series", "--preset", "paper", "--delete", "1", "--degree", "2", "--query", "max"], "data"),
    (["series", "--preset", "paper", "--data", "/nonexistent.txt", "--delete", "1", "--degree", "2", "--query", "max"], "data file not found"),
    (["series", "--preset", "digits", "--delete", "1", "--degree", "0", "--query", "test:1"], "--degree"),
    (["series", "--preset", "digits", "--delete", "1", "--degree", "101", "--query", "test:1"], "--degree"),
    (["series", "--preset", "digits", "--delete", "1", "--degree", "2", "--weight", "nan", "--query", "test:1"], "--weight"),
    (["retrain", "--preset", "digits", "--delete", "1", "--query", "test:1", "--steps", "100000"], "steps"),
    (["retrain", "--preset", "digits", "--delete", "1", "--query", "test:1", "--weight", "inf"], "--weight"),
    (["retrain", "--preset", "digits", "--delete", "0:3000000000", "--query", "test:1"], "out of range"),
    (["influence", "--preset", "digits", "--query", "test:1", "--top", "0"], "--top"),
    (["influence", "--preset", "digits"], "at least one --query"),
    # stability
    (["stability", "/nonexistent/sketch"], "sketch directory not found"),
    (["stability", "{d}", "--tolerance", "-1"], "--tolerance must be a positive number"),
    (["stability", "{d}", "--tolerance", "0"], "--tolerance must be a positive number"),
    (["stability", "{d}", "--tolerance", "nan"], "--tolerance must be a positive number"),
    (["stability", "{d}", "--plot", "{t}/x.txt"], "--plot must name a .png"),
    (["stability", "{d}", "--plot", "{t}/dir.png"], "is a directory"),
    (["stability", "{d}", "--query", "bogus"], "query"),
    # reproduce, demo, top level
    (["reproduce", "fig4"], "fig4"),
    (["reproduce", "fig1"], "--data"),
    (["reproduce", "fig2", "--data", "{words}", "--directions", "5"], "no --directions"),
    (["reproduce", "fig1", "--data", "{words}", "--steps", "0"], "--steps"),
    (["reproduce", "fig1", "--data", "{words}", "--workers", "-1"], "--workers"),
    (["demo", "--directions", "0"], "--directions"),
    (["demo", "--degree", "0"], "--degree"),
    (["demo", "--out", "{words}"], "not a directory"),
    (["frobnicate"], "frobnicate"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    (t / "words.txt").write_text("one\ntwo\n")
    (t / "binary.bin").write_bytes(b"\xff\xfe\xfa\x00")
    (t / "empty.txt").write_text("# nothing\n")
    (t / "dir.png").mkdir()
    return t


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a)[:70] for a, _ in BAD])
def test_malformed_input_is_refused_in_one_line(clean, scratch, capsys, args, needle):
    fill = {"d": clean, "t": scratch, "words": scratch / "words.txt", "binary": scratch / "binary.bin",
            "empty": scratch / "empty.txt"}
    before = sorted(p.name for p in scratch.iterdir())
    rc, out, err = cli(capsys, *[a.format(**fill) for a in args])
    assert_refused(rc, err, needle)
    assert "Traceback" not in err and not out.strip()
    assert sorted(p.name for p in scratch.iterdir()) == before  # refused before anything was written
    note("cli", " ".join(args), "refused")
