"""tools/setup_env.sh's helpers: step lines, the heartbeat of long commands, the log files, the
timing summary and the fingerprint that skips an unchanged mmboat build (sourced, not run)."""
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import time

import pytest
from tool_helpers import ROOT, TOOLS

SETUP = osp.join(TOOLS, 'setup_env.sh')


def _bash(script: str, tmp_path, setup: str = SETUP, **env) -> subprocess.CompletedProcess:
    """Source ``setup`` (defining its helpers, running nothing) and run ``script``."""
    full_env = dict(os.environ, MMBOAT_SETUP_LOGS=str(tmp_path / 'logs'),
                    MMBOAT_VENV=str(tmp_path / 'no_venv'), **env)
    # The venv's python (torch for the fingerprint) first on PATH, as after activation.
    full_env['PATH'] = osp.dirname(sys.executable) + os.pathsep + full_env['PATH']
    return subprocess.run(['bash', '-c', f'. {setup}\n{script}'], env=full_env, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)


def test_sourcing_runs_nothing(tmp_path):
    proc = _bash('echo sourced', tmp_path)
    assert proc.returncode == 0 and proc.stdout == 'sourced\n', proc.stdout
    assert not (tmp_path / 'no_venv').exists()


def test_heartbeat_log_file_and_summary(tmp_path):
    start = time.time()
    proc = _bash('step fake "a fake long step"\n'
                 'run_logged fake "sleeping" bash -c "echo first; sleep 3.5; echo last"\n'
                 'STEP_NOTE="a note"\n'
                 'step other "a short step"\n'
                 'summary', tmp_path, MMBOAT_HEARTBEAT_S='1')
    took = time.time() - start
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    log_file = str(tmp_path / 'logs' / 'fake.log')
    assert lines[0] == '[setup_env 0m00s] 1/5 a fake long step'
    assert lines[1] == f'[setup_env 0m00s]   sleeping (log: {log_file})'
    beats = [line for line in lines if '... still sleeping' in line]
    assert 2 <= len(beats) <= 4, lines
    so_far = [int(re.search(r'0m(\d\d)s so far', b).group(1)) for b in beats]
    assert so_far == sorted(so_far) and so_far[0] >= 1 and all(log_file in b for b in beats)
    assert not any(line in ('first', 'last') for line in lines)  # output goes to the file only
    with open(log_file) as f:
        assert f.read().splitlines() == ['$ bash -c echo\\ first\\;\\ sleep\\ 3.5\\;\\ echo\\ last',
                                         'first', 'last']
    # The heartbeat stops with the command: nothing after the step ended, no waiting for it.
    second = next(i for i, line in enumerate(lines) if line.endswith('2/5 a short step'))
    assert lines.index(beats[-1]) < second
    assert took < 3.5 + 3, took
    summary = lines[lines.index(next(x for x in lines if 'time per step' in x)):]
    assert re.fullmatch(r'\[setup_env 0m0\ds\] done in 0m0\ds; time per step \(logs in .*\):',
                        summary[0]), summary
    assert re.fullmatch(r' +fake +0m0[34]s +a note', summary[1]), summary
    assert re.fullmatch(r' +other +0m00s +', summary[2]), summary


def test_failure_shows_the_log_tail_and_stops(tmp_path):
    proc = _bash('set -e\nstep broken "a failing step"\n'
                 'run_logged broken "compiling" bash -c \'for i in $(seq 60); do echo line $i; '
                 'done; exit 3\'\necho not reached', tmp_path)
    assert proc.returncode == 3, proc.stdout
    assert 'not reached' not in proc.stdout
    assert re.search(r'ERROR: compiling failed \(exit code 3\) after 0m0\ds; last lines of '
                     + re.escape(str(tmp_path / 'logs' / 'broken.log')), proc.stdout)
    tail = [line for line in proc.stdout.splitlines() if line.startswith('    | ')]
    assert tail[0] == '    | line 21' and tail[-1] == '    | line 60' and len(tail) == 40


def test_build_fingerprint_follows_sources_and_switches(tmp_path):
    # A copy of the script in a fake clone, so that the fingerprint reads its files.
    clone = tmp_path / 'clone'
    (clone / 'tools').mkdir(parents=True)
    (clone / 'csrc' / 'pytorch').mkdir(parents=True)
    shutil.copy(SETUP, clone / 'tools')
    (clone / 'csrc' / 'pytorch' / 'op.cpp').write_text('int f() { return 1; }\n')
    (clone / 'setup.py').write_text('# setup\n')
    (clone / 'pyproject.toml').write_text('[project]\n')
    setup = str(clone / 'tools' / 'setup_env.sh')

    def fingerprint(**env):
        proc = _bash('mmboat_fingerprint', tmp_path, setup=setup, **env)
        assert proc.returncode == 0 and re.fullmatch(r'[0-9a-f]{64}\n', proc.stdout), proc.stdout
        return proc.stdout

    first = fingerprint()
    assert fingerprint() == first
    assert fingerprint(MMBOAT_WITH_OPS='0') != first
    assert fingerprint(TORCH_CUDA_ARCH_LIST='9.0') != first
    (clone / 'csrc' / 'pytorch' / 'op.cpp').write_text('int f() { return 2; }\n')
    changed = fingerprint()
    assert changed != first
    (clone / 'pyproject.toml').write_text('[project]\nname = "x"\n')
    assert fingerprint() != changed

    # mmboat imports from this clone, not from the fake one (whatever the current directory).
    assert _bash('mmboat_installed', tmp_path, MMBOAT_WITH_OPS='0').returncode == 0
    assert _bash('mmboat_installed', tmp_path, setup=setup,
                 MMBOAT_WITH_OPS='0').returncode == 1


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_shellcheck():
    proc = subprocess.run(['shellcheck', '-S', 'warning', SETUP, osp.join(TOOLS, 'demo.sh')],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
