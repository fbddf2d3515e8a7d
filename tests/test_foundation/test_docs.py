"""The docs/ pages: every citation of them resolves, none of the old spec/ ones remain, the
pages link to each other correctly and their ``>>>`` examples hold against the code."""
import doctest
import os
import re
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, 'docs')
PAGES = sorted(name for name in os.listdir(DOCS) if name.endswith('.md'))

# Files of the repository that may cite the docs (sources, scripts, configs, documentation).
CODE_EXTENSIONS = ('.py', '.h', '.cpp', '.cu', '.cuh', '.sh', '.md', '.yml', '.yaml', '.toml',
                   '.txt', '.cfg')
SKIPPED_DIRS = {'build', 'dist', 'work_dirs', '__pycache__', 'node_modules'}

# `docs/<page>.md` with an optional `#<section>` anchor.
DOCS_CITATION = re.compile(r'(?<![\w-])docs/([\w-]+\.md)(?:#([\w-]+))?')
# Citations of the specification that lived outside the repository: `spec/<page>.md`,
# "spec ``<page>.md``", "spec <page>.md" and "spec section(s) N".
SPEC_CITATIONS = (re.compile(r'\bspec/[\w-]+\.md'), re.compile(r'\bspec\s+`*[\w-]+\.md'),
                  re.compile(r'\bspec\s+sections?\s+\d'))
# Relative Markdown links inside the docs: `](target)` or `](target#anchor)`.
MARKDOWN_LINK = re.compile(r'\]\(([^)\s]+)\)')


def _repository_files() -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith('.') and d not in SKIPPED_DIRS
                       and not d.endswith('.egg-info')]
        for name in filenames:
            if name.endswith(CODE_EXTENSIONS):
                yield os.path.join(dirpath, name)


def _read(path: str) -> str:
    with open(path, encoding='utf-8', errors='replace') as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def _anchors(page: str) -> Set[str]:
    anchors = set()
    in_fence = False
    for line in _read(os.path.join(DOCS, page)).splitlines():
        if line.startswith('```'):
            in_fence = not in_fence
        elif not in_fence and re.match(r'#{1,6} ', line):
            anchors.add(_slug(line.lstrip('#')))
    return anchors


def _docs_citations() -> List[Tuple[str, int, str, str]]:
    """(file, line, page, anchor) of every `docs/<page>.md[#anchor]` in the repository."""
    found = []
    for path in _repository_files():
        for lineno, line in enumerate(_read(path).splitlines(), 1):
            for match in DOCS_CITATION.finditer(line):
                found.append((os.path.relpath(path, ROOT), lineno, match.group(1),
                              match.group(2) or ''))
    return found


def test_slug_follows_github():
    assert _slug('Ops, dtypes and autocast') == 'ops-dtypes-and-autocast'
    assert _slug('Two and three dimensions') == 'two-and-three-dimensions'
    assert _slug('The `rpb` table (2-D)') == 'the-rpb-table-2-d'


def test_code_cites_the_docs():
    cited_pages = {page for _, _, page, _ in _docs_citations()}
    # The op rules are cited from the kernels and the references, the models from the backbones.
    assert {'neighborhood_attention.md', 'feature_space_attention.md', 'models.md'} <= cited_pages


def test_every_docs_citation_resolves():
    anchors: Dict[str, Set[str]] = {page: _anchors(page) for page in PAGES}
    broken = []
    for path, lineno, page, anchor in _docs_citations():
        if page not in anchors:
            broken.append(f'{path}:{lineno}: docs/{page} does not exist')
        elif anchor and anchor not in anchors[page]:
            broken.append(f'{path}:{lineno}: docs/{page} has no section #{anchor} (sections: '
                          f'{sorted(anchors[page])})')
    assert not broken, 'citations of docs/ that do not resolve:\n' + '\n'.join(broken)


def test_no_spec_citation_remains():
    left = []
    for path in _repository_files():
        for lineno, line in enumerate(_read(path).splitlines(), 1):
            if any(pattern.search(line) for pattern in SPEC_CITATIONS):
                left.append(f'{os.path.relpath(path, ROOT)}:{lineno}: {line.strip()}')
    assert not left, ('the specification outside the repository is cited; cite the docs/ page '
                      'instead:\n' + '\n'.join(left))


def test_docs_links_resolve():
    broken = []
    for page in PAGES:
        for target in MARKDOWN_LINK.findall(_read(os.path.join(DOCS, page))):
            if re.match(r'[a-z]+://', target):
                continue
            file_part, _, anchor = target.partition('#')
            path = os.path.normpath(os.path.join(DOCS, file_part)) if file_part else os.path.join(
                DOCS, page)
            if not os.path.exists(path):
                broken.append(f'docs/{page}: link to missing {target}')
            elif anchor and os.path.dirname(path) == DOCS and anchor not in _anchors(
                    os.path.basename(path)):
                broken.append(f'docs/{page}: link to missing section {target}')
    assert not broken, '\n'.join(broken)


def test_index_and_readme_link_every_page():
    index = _read(os.path.join(DOCS, 'README.md'))
    missing = [page for page in PAGES if page != 'README.md' and f']({page})' not in index]
    assert not missing, f'docs/README.md does not link {missing}'
    readme = _read(os.path.join(ROOT, 'README.md'))
    assert '](docs/README.md)' in readme
    layout = readme.split('## Layout', 1)[1]
    assert re.search(r'^docs/\s', layout, re.MULTILINE), 'README Layout block lacks docs/'


def _examples(page: str) -> str:
    """The ``>>>`` examples of a page's fenced ``python`` blocks, in page order."""
    blocks = re.findall(r'^```python\n(.*?)^```', _read(os.path.join(DOCS, page)),
                        re.MULTILINE | re.DOTALL)
    return '\n'.join(block for block in blocks if '>>>' in block)


@pytest.mark.parametrize('page', [p for p in PAGES if _examples(p)])
def test_docs_examples_hold(page):
    """The examples of one page share a namespace and run in order, like a doctest file."""
    text = _examples(page)
    test = doctest.DocTestParser().get_doctest(text, {}, page, os.path.join(DOCS, page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    failures: List[str] = []
    runner.run(test, out=failures.append)
    assert runner.failures == 0, ''.join(failures)
