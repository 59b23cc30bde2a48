"""The README's commands, run the way a newcomer pastes them: every line of every ```sh block is either run or
skipped for a reason written down here, so a command added to the README without a rule fails this test.

What "as pasted" means: the line's exact text goes to bash (so its trailing `# comment` is bash's to ignore), with
one change — a leading `sudo ` is dropped, because the suite already runs as root and Debian's minimal images have
no sudo. The commands find `otel-ebpf-receiver` & co. through launchers written by deploy/install-launchers.sh
(what `make setup` puts in /usr/local/bin), first on PATH; OTEL_* variables of the calling shell are removed.

Run as pasted:
  * `otel-ebpf-receiver doctor` and `probes`: exit 0 on this host;
  * the blocklist commands (block, unblock, allow, blocklist, blocklist import), in README order, inside a private
    mount namespace with a fresh bpffs on /sys/fs/bpf and a tmpfs on /var/lib/otel-ebpf-receiver, so they never
    touch this host's real lists; `threat-feed.txt` is a small file the test writes.
Run with ` --check` appended (loads and validates everything, starts nothing; see cli/check.py):
  * every `otel-ebpf-receiver run ...` line, including `sudo env OTEL_...=... otel-ebpf-receiver run`, whose check
    line must show the endpoint it was given; `config.yaml` is the README's configuration example, written to the
    working directory, so the example itself (`mitigation: {mode: off}` included) is validated.
Skipped, and why (SKIPPED below):
  * `make run` starts the agent until stopped; `make test` is this suite;
  * `otel-ebpf-lab record-host` (and `otel-ebpf-model record`) records for minutes; `train`, `export`, `info` need
    its recordings (the training path is tested in test_model_export.py); so does `otel-ebpf-lab adapt`
    (test_adapt.py runs it on recorded windows);
  * `otelcol-contrib --config=...` needs the user's own otelcol-contrib; the same merge is validated with the
    project's Collector in test_collector_configs.py.
Also: `--help` of every verb of the three commands, and no `VAR=value sudo ...` anywhere we document commands.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PROGRAMS = ("otel-ebpf-receiver", "otel-ebpf-model", "otel-ebpf-lab")

SKIPPED = {
    r"make run\b": "starts the agent and runs until stopped",
    r"make test\b": "is this test-suite",
    r"make stack\b": "runs until stopped; tests/test_stack.py runs the same launcher, bounded, with browser checks",
    r"otel-ebpf-(model|lab) record(-host)?\b": "records windows for minutes",
    r"otel-ebpf-lab adapt\b": "records this host for minutes; test_adapt.py runs it on recorded windows",
    r"otel-ebpf-model (train|export|info)\b": "works on the recordings `record` writes (test_model_export.py)",
    r"otelcol-contrib\b": "needs the user's otelcol-contrib; the merge is validated in test_collector_configs.py",
}
AS_PASTED = r"otel-ebpf-receiver (doctor|probes)\b"
BLOCKLIST = r"otel-ebpf-receiver (block|unblock|allow|disallow|blocklist)\b"
RUN = r"(env( \S+=\S+)+ )?otel-ebpf-receiver run\b"


def sh_lines(text: str) -> list[str]:
    """Every command line of the ```sh blocks, continuation lines joined, blank and comment-only lines dropped."""
    lines: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def as_root(line: str) -> str:
    return re.sub(r"^sudo\s+", "", line)


def words(line: str) -> list[str]:
    return shlex.split(as_root(line), comments=True)


def kind(line: str) -> str:
    command = as_root(line)
    for pattern, reason in SKIPPED.items():
        if re.match(pattern, command):
            return "skip"
    for name, pattern in (("pasted", AS_PASTED), ("blocklist", BLOCKLIST), ("run", RUN)):
        if re.match(pattern, command):
            return name
    return "unknown"


LINES = sh_lines(README.read_text())


def config_example() -> str:
    """The ```yaml block of the README's Configuration section."""
    section = README.read_text().split("\n## Configuration\n", 1)[1]
    return re.search(r"^```yaml\n(.*?)^```", section, re.M | re.S).group(1)


def test_every_readme_command_is_run_or_skipped_for_a_reason():
    assert len(LINES) >= 12, "the README's sh blocks were not found"
    unknown = [line for line in LINES if kind(line) == "unknown"]
    assert not unknown, f"README commands with no rule in tests/test_readme.py (run them or say why not): {unknown}"
    assert any(kind(line) == "run" and "--config config.yaml" in line for line in LINES), \
        "the configuration example is no longer checked by a `run --config config.yaml` line"


def test_no_variable_set_before_sudo():
    """`VAR=value sudo cmd` loses VAR: sudo resets the environment. Documented commands use `sudo env VAR=value`."""
    from model_export.cli import build_parser as model_parser
    from otel_ebpf_receiver.cli import build_parser

    # Commands only, not prose that warns about the pattern: the sh blocks, the indented code of
    # collector-config/README.md, and the CLI help texts (whose epilogs are examples).
    collector_readme = (REPO / "collector-config" / "README.md").read_text()
    texts = {"README.md": "\n".join(LINES),
             "collector-config/README.md": "\n".join(re.findall(r"^    \S.*$", collector_readme, re.M))}
    for prog, parser in (("otel-ebpf-receiver", build_parser()), ("otel-ebpf-model", model_parser())):
        for verb, sub in subcommands(parser).items():
            texts[f"{prog} {verb} --help"] = sub.format_help()
        texts[f"{prog} --help"] = parser.format_help()
    for where, text in texts.items():
        bad = re.findall(r"^\s*(?:[A-Z][A-Z0-9_]*=\S+\s+)+sudo\b.*$", text, re.M)
        assert not bad, f"{where}: variables before sudo are dropped by sudo; write `sudo env VAR=value ...`: {bad}"


def subcommands(parser) -> dict:
    import argparse

    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def test_every_verb_has_help():
    """`PROGRAM VERB --help` exits 0 for every verb of the three commands (in process: argparse builds the text)."""
    from model_export.cli import build_parser as model_parser
    from model_export.lab.cli import build_parser as lab_parser
    from otel_ebpf_receiver.cli import build_parser

    for prog, parser in zip(PROGRAMS, (build_parser(), model_parser(), lab_parser())):
        verbs = subcommands(parser)
        assert verbs, f"{prog} has no verbs"
        for verb in verbs:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
                parser.parse_args([verb, "--help"])
            assert exited.value.code == 0 and "usage:" in out.getvalue(), f"{prog} {verb} --help"


# --- running the commands ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def launchers(tmp_path_factory) -> Path:
    bindir = tmp_path_factory.mktemp("bin")
    out = subprocess.run(["bash", str(REPO / "deploy" / "install-launchers.sh"), str(REPO), str(bindir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return bindir


@pytest.fixture
def shell(launchers, tmp_path):
    """Runs one command line with bash in a scratch directory holding the README's config.yaml."""
    (tmp_path / "config.yaml").write_text(config_example())
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PATH"] = f"{launchers}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"

    def run(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)
    return run


@pytest.mark.bpf
@pytest.mark.parametrize("line", [line for line in LINES if kind(line) == "pasted"])
def test_command_as_pasted(shell, line):
    out = shell(as_root(line))
    assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
    assert out.stdout.strip(), f"{line} printed nothing"


@pytest.mark.bpf
@pytest.mark.parametrize("line", [line for line in LINES if kind(line) == "run"])
def test_run_command_checks(shell, line):
    argv = words(line)
    if "--check" not in argv:
        argv.append("--check")
    out = shell(shlex.join(argv))
    assert out.returncode == 0 and "configuration ok" in out.stdout, f"{line}\n{out.stdout}{out.stderr}"
    assert len(out.stdout.strip().splitlines()) == 1, f"--check prints one line: {out.stdout}"
    for word in argv:  # variables given on the line reach the agent (the reason for `sudo env`)
        if word.startswith("OTEL_EXPORTER_OTLP_ENDPOINT="):
            assert f"otlp to {word.split('=', 1)[1]}" in out.stdout, out.stdout
    if "--config" in argv:  # the README's configuration example, YAML's bare `off` included
        assert "probes syscalls, file_open, exec;" in out.stdout and "mitigation off" in out.stdout, out.stdout


@pytest.mark.bpf
def test_blocklist_commands_as_pasted(shell):
    """In README order, in a private mount namespace: a fresh bpffs and state directory, this host's lists untouched."""
    lines = [line for line in LINES if kind(line) == "blocklist"]
    assert any(" import " in line for line in lines)
    assert ["otel-ebpf-receiver", "blocklist"] in [words(line) for line in lines], "the listing is not in the README"
    shell("printf '198.51.100.0/24\\n# a comment\\n192.0.2.99\\n' > threat-feed.txt")
    os.makedirs("/var/lib/otel-ebpf-receiver", exist_ok=True)
    before = pins_snapshot()
    script = ["set -e", "mount -t bpf bpf /sys/fs/bpf", "mount -t tmpfs tmpfs /var/lib/otel-ebpf-receiver"]
    for i, line in enumerate(lines):
        script += [f"echo '>>> {i}'", as_root(line)]
    out = shell(f"exec unshare --mount --propagation private bash -c {shlex.quote(chr(10).join(script))}")
    steps = out.stdout.split(">>> ")
    assert out.returncode == 0, f"failed at: {lines[len(steps) - 2]}\n{out.stdout}{out.stderr}"
    listing = next(step for i, step in enumerate(steps[1:]) if words(lines[i]) == ["otel-ebpf-receiver", "blocklist"])
    for cidr in ("203.0.113.7/32", "2001:db8:bad::/48", "198.51.100.0/24", "192.0.2.99/32"):
        assert cidr in listing, f"{cidr} not listed:\n{listing}"
    assert pins_snapshot() == before, "the host's own pinned lists changed"


def pins_snapshot() -> list | None:
    pins = Path("/sys/fs/bpf/otel-ebpf-receiver")
    return sorted((p.name, p.stat().st_mtime_ns) for p in pins.iterdir()) if pins.is_dir() else None
