"""The CPU side of tools/gpu_check.sh: argument handling, a clean refusal that names what is
missing, the step logic (with a stand-in python that plays a GPU machine's steps), and the pure
logic of its python modules (preflight, ext_check, junit_summary, benchmark, sanitizer cases)."""
import json
import os
import os.path as osp
import stat
import subprocess
import sys

import pytest
import torch
from tool_helpers import ROOT, TOOLS, load_tool

preflight = load_tool('gpu_check/preflight.py')
benchmark = load_tool('gpu_check/benchmark.py')
junit = load_tool('gpu_check/junit_summary.py')
ext_check = load_tool('gpu_check/ext_check.py')
SCRIPT = osp.join(TOOLS, 'gpu_check.sh')


def _run(*args, python=sys.executable, **env):
    return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, 'PYTHON': python, **env}, timeout=120)


# ---------------------------------------------------------------------------------------------
# Arguments and the refusal on this (GPU-less) machine.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('args, message', [
    ((), 'OUT_DIR (the folder for the results) is missing'),
    (('--quick', ), 'OUT_DIR (the folder for the results) is missing'),
    (('out', '--bogus'), 'unknown argument: --bogus'),
    (('out', '--wheels'), '--wheels needs a folder'),
    (('out', '--budget', 'soon'), '--budget needs seconds'),
])
def test_bad_arguments_print_the_usage(args, message):
    res = _run(*args)
    assert res.returncode == 64
    assert 'usage: bash tools/gpu_check.sh OUT_DIR' in res.stderr and message in res.stderr
    assert 'Traceback' not in res.stderr


def test_help():
    res = _run('--help')
    assert res.returncode == 0 and res.stdout.startswith('usage: bash tools/gpu_check.sh')
    assert 'compute-sanitizer' in res.stdout and '--wheels DIR' in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_refuses_cleanly_without_a_gpu(tmp_path):
    res = _run(str(tmp_path / 'out'))
    assert res.returncode == 2, res.stdout + res.stderr
    assert 'this machine cannot run the GPU check' in res.stderr
    assert 'Traceback' not in res.stderr + res.stdout
    expected = ('is a CPU build' if torch.version.cuda is None else 'no CUDA device is visible')
    assert 'MISSING: ' in res.stderr and expected in res.stderr
    summary = (tmp_path / 'out' / 'summary.txt').read_text()
    assert f'TORCH={torch.__version__}' in summary and expected in summary
    assert 'preflight  FAIL' in summary
    assert not (tmp_path / 'out' / 'build.log').exists()  # nothing was built


def test_refuses_without_python(tmp_path):
    res = _run(str(tmp_path / 'out'), python='/nonexistent/python3')
    assert res.returncode == 2
    assert 'MISSING: /nonexistent/python3 (Python 3) is not on PATH' in res.stderr


# ---------------------------------------------------------------------------------------------
# preflight.py
# ---------------------------------------------------------------------------------------------
def test_preflight_names_each_missing_piece(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', '12.8')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch, '__version__', '2.5.1+cu128')
    monkeypatch.setenv('PATH', '/nonexistent')
    monkeypatch.setenv('CUDA_HOME', '/nonexistent')
    monkeypatch.setattr(preflight.os.path, 'isfile', lambda path: False)
    facts, missing = preflight.check()
    text = '\n'.join(missing)
    assert 'older than 2.6' in text
    assert 'no CUDA device is visible' in text
    assert 'nvcc (the CUDA compiler) is not on PATH' in text
    assert 'TORCH=2.5.1+cu128' in facts and 'SANITIZER=' in facts
    monkeypatch.setattr(torch.version, 'cuda', None)
    _, missing = preflight.check()
    assert any('is a CPU build' in m for m in missing)


def test_preflight_accepts_a_gpu_machine_and_names_a_cuda_mismatch(monkeypatch, tmp_path):
    home = tmp_path / 'cuda'
    (home / 'include').mkdir(parents=True)
    (home / 'include' / 'cuda_runtime.h').write_text('')
    (home / 'bin').mkdir()
    for tool in ('nvcc', 'compute-sanitizer'):
        (home / 'bin' / tool).write_text('#!/bin/sh\n')
        (home / 'bin' / tool).chmod(0o755)
    monkeypatch.setenv('PATH', str(home / 'bin') + os.pathsep + os.environ['PATH'])
    monkeypatch.delenv('CUDA_HOME', raising=False)
    monkeypatch.delenv('CUDA_PATH', raising=False)
    monkeypatch.setattr(torch, '__version__', '2.11.0+cu130')
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i=0: (9, 0))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda i=0: 'NVIDIA H100 80GB HBM3')
    monkeypatch.setattr(preflight, 'nvcc_release', lambda nvcc: '13.0')
    facts, missing = preflight.check()
    assert missing == []
    assert {'ARCH=9.0', 'DEVICE=NVIDIA H100 80GB HBM3', f'CUDA_HOME={home}',
            f'SANITIZER={home}/bin/compute-sanitizer', 'NVCC_RELEASE=13.0'} <= set(facts)
    monkeypatch.setattr(preflight, 'nvcc_release', lambda nvcc: '12.4')
    _, missing = preflight.check()
    assert len(missing) == 1 and "nvcc 12.4 and torch's CUDA 13.0 differ" in missing[0]


def test_preflight_parse_version():
    assert preflight.parse_version('2.11.0+cu130') == (2, 11, 0)
    assert preflight.parse_version('2.6.0a0+git1234') == (2, 6, 0)
    assert preflight.parse_version('2.13.0') >= (2, 6) > preflight.parse_version('2.5.1+cpu')


# ---------------------------------------------------------------------------------------------
# The step logic, with a stand-in python playing the GPU machine's commands.
# ---------------------------------------------------------------------------------------------
JUNIT_OK = '''<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"
 errors="0" failures="0" skipped="1" tests="3" time="12.5">
<testcase classname="tests.test_ops.test_neighborhood_attention_cuda" name="test_a[fp16]"
 time="0.1"/>
<testcase classname="tests.test_ops.test_feature_space_attention_cuda" name="test_b" time="0.1"/>
<testcase classname="tests.test_ops.test_neighborhood_attention_cuda" name="test_layer"
 time="0.0"><skipped type="pytest.skip" message="mmboat.models needs mmengine">s</skipped>
</testcase></testsuite></testsuites>'''
JUNIT_FAIL = JUNIT_OK.replace(
    'name="test_b" time="0.1"/>',
    'name="test_b[N23]" time="0.1"><failure message="AssertionError: Tensor-likes are not '
    'close!&#10;Mismatched elements: 3 / 100">trace</failure></testcase>')
JUNIT_NO_CUDA = JUNIT_OK.replace(
    'name="test_b" time="0.1"/>',
    'name="test_b" time="0.1"><skipped type="pytest.skip" message="needs a CUDA device and '
    'the CUDA build of mmboat._ext">s</skipped></testcase>')


@pytest.fixture
def fake_gpu(tmp_path):
    """A stand-in python (and compute-sanitizer) for the commands gpu_check.sh runs; the rest
    (junit_summary.py) goes to the real interpreter. Returns a runner taking the junit text and
    the exit codes of the build, pytest and the sanitizer."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    sanitizer = bin_dir / 'compute-sanitizer'
    fake = bin_dir / 'python3'
    fake.write_text(f'''#!/usr/bin/env bash
case "$1" in
  */preflight.py)
    printf 'PYTHON=3.12.3\\nTORCH=2.11.0+cu130\\nTORCH_CUDA=13.0\\nDEVICE=Fake H100\\n'
    printf 'ARCH=9.0\\nNVCC_RELEASE=13.0\\nCUDA_HOME=\\nPYTEST_TIMEOUT=1\\nNINJA=1\\n'
    echo "SANITIZER=${{FAKE_SANITIZER:-}}"; exit 0 ;;
  setup.py) echo "building for $TORCH_CUDA_ARCH_LIST"; exit "${{FAKE_BUILD_RC:-0}}" ;;
  */ext_check.py) echo 'torch=2.11.0;cuda=1;archs=9.0'; exit 0 ;;
  */sanitizer_cases.py) echo 'sanitizer cases: 8 (op family, dtype) groups ran on cuda'; exit 0 ;;
  */benchmark.py)
    printf '# bench\\n\\n| a |\\n%s\\n' "${{FAKE_NOTE:-}}" > "$3/benchmark.md"; exit 0 ;;
  -m) if [ "$2" = pytest ]; then
        for a in "$@"; do
          case "$a" in --junitxml=*) cp "$FAKE_JUNIT" "${{a#--junitxml=}}";; esac
        done
        echo "fake pytest"; exit "${{FAKE_PYTEST_RC:-0}}"
      fi ;;
esac
exec {sys.executable} "$@"
''')
    sanitizer.write_text('''#!/usr/bin/env bash
if [ -n "${FAKE_SAN_ERROR:-}" ]; then
  echo '========= Invalid __global__ read of size 4 bytes'; echo '========= ERROR SUMMARY: 1 error'
  exit 1
fi
shift 6; "$@"; echo '========= ERROR SUMMARY: 0 errors'
''')
    for f in (fake, sanitizer):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)

    def run(junit_text=JUNIT_OK, *args, with_sanitizer=False, **env):
        (tmp_path / 'tests.xml').write_text(junit_text)
        out = tmp_path / 'out'
        extra = {'FAKE_JUNIT': str(tmp_path / 'tests.xml'), 'MMBOAT_GPU_WHEELS': '',
                 'FAKE_SANITIZER': str(sanitizer) if with_sanitizer else ''}
        res = _run(str(out), *args, python=str(fake), **{**extra, **env})
        summary = (out / 'summary.txt').read_text() if (out / 'summary.txt').exists() else ''
        return res, summary

    return run


def _line(summary, step):
    return next(line for line in summary.splitlines() if line.startswith(f'{step} '))


def test_all_steps_pass(fake_gpu):
    res, summary = fake_gpu(JUNIT_OK, '--no-build', with_sanitizer=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'PASS' in _line(summary, 'preflight') and 'Fake H100 (sm_90)' in summary
    assert 'PASS' in _line(summary, 'build') and 'cuda=1' in _line(summary, 'build')
    assert 'SKIP' in _line(summary, 'wheels') and 'gpu_check_wheels.sh' in summary
    assert 'PASS  ' in _line(summary, 'tests')
    assert '2 passed, 0 failed, 0 errors, 1 skipped' in _line(summary, 'tests')
    assert 'SKIPPED (1): mmboat.models needs mmengine' in summary
    assert 'PASS' in _line(summary, 'sanitizer') and 'ERROR SUMMARY: 0 errors' in summary
    assert 'PASS' in _line(summary, 'benchmark')
    assert '| a |' in res.stdout  # the tables are printed
    assert 'all steps passed' in summary and summary.count('s  ') >= 6  # times per step


def test_benchmark_errors_are_reported_without_failing(fake_gpu):
    res, summary = fake_gpu(JUNIT_OK, '--no-build',
                            FAKE_NOTE='* swin forward, float16 7x7 batch 1: RuntimeError: no')
    assert res.returncode == 0
    assert '(1 timings raised, see its notes)' in _line(summary, 'benchmark')


def test_build_runs_for_the_local_arch(fake_gpu, tmp_path):
    res, summary = fake_gpu(JUNIT_OK)
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'building for 9.0' in (tmp_path / 'out' / 'build.log').read_text()
    assert 'SKIP' in _line(summary, 'sanitizer') and 'compute-sanitizer not found' in summary


def test_a_failed_test_fails_loudly_and_is_named(fake_gpu):
    res, summary = fake_gpu(JUNIT_FAIL, FAKE_PYTEST_RC='1')
    assert res.returncode == 1
    assert 'FAIL' in _line(summary, 'tests')
    failed = ('FAILED tests/test_ops/test_feature_space_attention_cuda.py::test_b[N23]: '
              'AssertionError: Tensor-likes are not close!')
    assert failed in res.stderr and failed in summary
    assert 'gpu_check: FAILED: tests' in res.stderr
    assert 'PASS' in _line(summary, 'benchmark')  # the other steps still ran


def test_skipped_cuda_tests_fail_the_step(fake_gpu):
    res, summary = fake_gpu(JUNIT_NO_CUDA)
    assert res.returncode == 1
    assert 'CUDA tests were skipped' in _line(summary, 'tests')


def test_a_failed_build_stops_the_check(fake_gpu, tmp_path):
    res, summary = fake_gpu(JUNIT_OK, FAKE_BUILD_RC='1')
    assert res.returncode == 1 and 'gpu_check: FAILED: build' in res.stderr
    assert 'FAIL' in _line(summary, 'build')
    assert not (tmp_path / 'out' / 'tests.log').exists()


def test_sanitizer_errors_fail_the_step(fake_gpu):
    res, summary = fake_gpu(JUNIT_OK, with_sanitizer=True, FAKE_SAN_ERROR='1')
    assert res.returncode == 1
    line = _line(summary, 'sanitizer')
    assert 'FAIL' in line and 'Invalid __global__ read' in line


def test_the_budget_bounds_the_steps(fake_gpu):
    res, summary = fake_gpu(JUNIT_OK, '--budget', '5')
    assert res.returncode == 1
    assert 'not run: the 5s budget is spent' in _line(summary, 'build')


def test_wheels_folder_without_wheels_fails(fake_gpu, tmp_path):
    (tmp_path / 'empty').mkdir()
    res, summary = fake_gpu(JUNIT_OK, '--no-build', '--wheels', str(tmp_path / 'empty'))
    assert res.returncode == 1 and 'no .whl files in' in _line(summary, 'wheels')


# ---------------------------------------------------------------------------------------------
# junit_summary.py and ext_check.py
# ---------------------------------------------------------------------------------------------
def test_junit_summary():
    assert junit.test_id('tests.test_ops.test_x', 'test_y[a-b]') == \
        'tests/test_ops/test_x.py::test_y[a-b]'
    assert junit.test_id('tests.test_x.TestCls', 'test_z') == 'tests/test_x.py::TestCls::test_z'
    ok = junit.summarize(JUNIT_OK)
    assert (ok['passed'], ok['failed'], ok['skipped']) == (2, 0, 1) and junit.verdict(ok) == []
    bad = junit.summarize(JUNIT_FAIL)
    assert bad['failures'] == [('tests/test_ops/test_feature_space_attention_cuda.py::'
                                'test_b[N23]', 'AssertionError: Tensor-likes are not close!')]
    assert junit.verdict(bad) == ['1 failed, 0 errors']
    assert 'CUDA tests were skipped' in junit.verdict(junit.summarize(JUNIT_NO_CUDA))[0]
    empty = junit.summarize('<testsuites><testsuite time="0"/></testsuites>')
    assert junit.verdict(empty) == ['no test passed']
    assert junit.main(['/nonexistent.xml']) == 1


def test_ext_check_problems():
    info = ext_check.parse_info('torch=2.11.0;cuda=1;archs=9.0')
    assert info == {'torch': '2.11.0', 'cuda': '1', 'archs': '9.0'}
    assert ext_check.problems(info, [], '9.0') == []
    assert ext_check.problems({'cuda': '1', 'archs': '9.0'}, [], '8.0') == [
        'mmboat._ext was built for 9.0, which does not run on this device (8.0)']
    assert ext_check.arch_runs_on(['8.0', '9.0'], '8.6')  # sm_80 code runs on sm_86
    assert not ext_check.arch_runs_on(['8.6'], '8.0') and ext_check.arch_runs_on(['90a'], '9.0')
    assert ext_check.arch_runs_on(['8.6+PTX'], '8.9') and not ext_check.arch_runs_on(['7.5'], '8.0')
    found = ext_check.problems({'cuda': '0'}, ['na2d_forward'], '9.0')
    assert 'built without CUDA' in found[0] and 'mmboat::na2d_forward' in found[1]
    assert len(ext_check.OPS) == 13


# ---------------------------------------------------------------------------------------------
# benchmark.py and sanitizer_cases.py
# ---------------------------------------------------------------------------------------------
def test_benchmark_shapes():
    # NAT-Tiny stages; DiNAT's dilation min(8, L // k), never more than the map allows.
    assert benchmark.STAGES == [(56, 2), (28, 4), (14, 8), (7, 16)]
    assert benchmark.HEAD_DIM == 32 and benchmark.KERNEL == 7 and benchmark.BATCHES == [1, 2, 4, 8]
    assert [benchmark.dilations(s) for s, _ in benchmark.STAGES] == [[1, 8], [1, 4], [1, 2], [1]]
    for side in range(7, 300):
        ds = benchmark.dilations(side)
        assert ds[0] == 1 and ds[-1] == min(8, side // 7) and len(ds) == len(set(ds))
        assert all(7 * d <= side for d in ds)
    problems = benchmark.attention_problems()
    assert len(problems) == 16
    assert {(p['side'], p['heads']) for p in problems} == set(benchmark.STAGES)
    assert all(p['side'] % benchmark.WINDOW == 0 for p in problems)  # whole Swin windows


def test_benchmark_tables():
    row = dict(dtype='float16', map='56x56', heads=2, batch=1, dilation=8, na_fwd=0.1,
               swin_fwd=0.2, dense_fwd=1.0, na_fwd_bwd=0.3, swin_fwd_bwd=0.5, dense_fwd_bwd=3.0,
               swin_over_na=5 / 3, dense_over_na=10.0)
    meta = dict(device='GPU', torch='2.x', cuda='13.0', date='today', iters=10, warmup=3)
    text = benchmark.render(dict(meta=meta, attention=[row], layers='no mmengine (fix: x)',
                                 backbones=[dict(dtype='bfloat16', model='NAT-Tiny',
                                                 params_m=27.9, batch=32, image=224,
                                                 infer_img_s=1234.56, train_img_s=400.0)],
                                 notes=['cut']))
    assert ('| float16 | 56x56 | 2 | 1 | 8 | 0.100 | 0.200 | 1.000 | 0.300 | 0.500 | 3.000 '
            '| 1.667 | 10.000 |') in text
    assert 'skipped: no mmengine (fix: x)' in text
    assert '| bfloat16 | NAT-Tiny | 27.900 | 32 | 224 | 1234.6 | 400.0 |' in text
    assert '* cut' in text
    assert benchmark.markdown([dict(a=float('nan'), b=2.0)], ['a', 'b']).endswith(
        '| error | 2.000 |')
    for line in text.splitlines():  # every table row has its header's width
        if line.startswith('|'):
            assert line.count('|') in {len(cols) + 1 for _, _, cols in benchmark.SECTIONS}


def test_benchmark_runs_on_cpu_tiny_shapes(tmp_path):
    assert benchmark.main(['--out', str(tmp_path), '--device', 'cpu', '--smoke']) == 0
    results = json.loads((tmp_path / 'benchmark.json').read_text())
    assert len(results['attention']) == 3  # 14x14 (d 1, 2), 7x7 (d 1), bfloat16
    assert all(r['na_fwd'] > 0 and r['dense_fwd_bwd'] > 0 for r in results['attention'])
    text = (tmp_path / 'benchmark.md').read_text()
    if isinstance(results['layers'], str):  # no mmengine here
        assert 'skipped: mmboat.models is not importable' in text
    else:
        assert len(results['layers']) == 1 and len(results['backbones']) == 3
        assert 'Swin-Tiny (BOAT-Swin blocks, no FSLA)' in text
    if not torch.cuda.is_available():
        assert benchmark.main(['--out', str(tmp_path)]) == 2


def test_benchmark_reports_missing_mmengine(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mmboat.models', None)
    reason = benchmark.need_mmengine()
    assert 'mmengine' in reason and 'tools/gpu_check_wheels.sh' in reason


def test_benchmark_deadlines():
    deadlines = benchmark.Deadlines(100.0, start=benchmark.time.monotonic() - 60)
    assert deadlines.expired('attention') and not deadlines.expired('layers')


def test_sanitizer_cases_run_on_cpu():
    cases = load_tool('gpu_check/sanitizer_cases.py')
    assert cases.main(['--device', 'cpu']) == 0
