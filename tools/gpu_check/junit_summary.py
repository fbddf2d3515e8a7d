"""Summary of a pytest JUnit XML report for tools/gpu_check.sh (standard library only).

Prints the counts, one ``FAILED <test id>: <first line of the message>`` line per failure or
error, and the skip reasons with their counts. Exits 1 when a test failed or errored, when no
test passed, or when a test was skipped because the CUDA device or the CUDA build was not
there (on the GPU machine that means the CUDA tests did not run); else 0.

    python tools/gpu_check/junit_summary.py OUT_DIR/tests.xml
"""
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Dict, List

# A skip with one of these reasons means the CUDA op tests did not really run.
FATAL_SKIPS = ('needs a CUDA device', 'CUDA build of mmboat._ext')


def test_id(classname: str, name: str) -> str:
    """pytest's node id from a JUnit (classname, name): ``tests.test_ops.test_x`` +
    ``test_y[a]`` -> ``tests/test_ops/test_x.py::test_y[a]``."""
    parts = classname.split('.') if classname else []
    # A test class (CamelCase, e.g. TestFoo) stays a '::' component.
    classes = []
    while parts and parts[-1][:1].isupper():
        classes.insert(0, parts.pop())
    path = '/'.join(parts) + '.py' if parts else '?'
    return '::'.join([path] + classes + [name])


def summarize(xml_text: str) -> Dict:
    """Counts, failures ``[(id, message)]`` and skip reasons of a JUnit XML report."""
    root = ET.fromstring(xml_text)
    result = dict(passed=0, failed=0, errors=0, skipped=0, time=0.0, failures=[],
                  skips=Counter())
    for suite in ([root] if root.tag == 'testsuite' else root.iter('testsuite')):
        result['time'] += float(suite.get('time', 0) or 0)
        for case in suite.iter('testcase'):
            tid = test_id(case.get('classname', ''), case.get('name', '?'))
            bad = [child for child in case if child.tag in ('failure', 'error')]
            skipped = [child for child in case if child.tag == 'skipped']
            if bad:
                for child in bad:
                    result['failed' if child.tag == 'failure' else 'errors'] += 1
                    message = (child.get('message') or child.text or '').strip()
                    first = message.splitlines()[0] if message else child.tag
                    result['failures'].append((tid, first[:300]))
            elif skipped:
                result['skipped'] += 1
                reason = (skipped[0].get('message') or 'no reason given').strip()
                result['skips'][reason.splitlines()[0][:200]] += 1
            else:
                result['passed'] += 1
    return result


def verdict(result: Dict) -> List[str]:
    """Why the test step fails (empty when it passes)."""
    why = []
    if result['failed'] or result['errors']:
        why.append(f"{result['failed']} failed, {result['errors']} errors")
    fatal = sum(n for reason, n in result['skips'].items()
                if any(key in reason for key in FATAL_SKIPS))
    if fatal:
        why.append(f'{fatal} CUDA tests were skipped (no CUDA device or no CUDA build)')
    if result['passed'] == 0:
        why.append('no test passed')
    return why


def render(result: Dict) -> str:
    lines = [f"{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, "
             f"{result['skipped']} skipped in {result['time']:.1f}s"]
    lines += [f'FAILED {tid}: {message}' for tid, message in result['failures']]
    lines += [f'SKIPPED ({n}): {reason}' for reason, n in sorted(result['skips'].items())]
    return '\n'.join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print('usage: python tools/gpu_check/junit_summary.py REPORT.xml', file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            result = summarize(f.read())
    except (OSError, ET.ParseError) as exc:
        print(f'no readable JUnit report at {argv[0]}: {exc}')
        return 1
    print(render(result))
    why = verdict(result)
    if why:
        print('VERDICT: ' + '; '.join(why))
    return 1 if why else 0


if __name__ == '__main__':
    sys.exit(main())
