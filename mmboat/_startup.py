"""Interpreter-start hook: stack fixes that must run before a module is first imported.

``tools/setup_env.sh`` installs ``mmboat_stack_fixes.pth`` into the environment's
site-packages; Python runs its one line at every interpreter start, which imports this module
and calls :func:`install`. Nothing heavy happens then (``mmboat/__init__`` imports only the
version; torch is not imported): :func:`install` puts a finder in front of ``sys.meta_path``
that acts once, when ``torchvision`` is first imported, by applying
:func:`mmboat.utils.compat.fix_torchvision_import` (this machine's CPU torch with the CUDA-built
torchvision wheel: ``operator torchvision::nms does not exist``) just before torchvision loads.
So ``import mmdet.models``, ``import mmseg.apis``, ``mmpretrain.apis.get_model`` and the
downstream packages' own tools work in a fresh interpreter with no extra call. Where
torchvision's own ops load, the fix does nothing. A second finder registers mmboat's model index
with mmpretrain's model hub right after ``mmpretrain.apis.model`` is imported
(:mod:`mmboat.utils.model_index`), so ``mmpretrain.list_models('*nat*')`` finds mmboat's models.

The weights-only allow-list for mmengine's checkpoints needs no hook: importing
``mmboat.models`` (what configs' ``custom_imports`` do) applies it.
"""
import importlib.abc
import sys

__all__ = ['install', 'install_pth', 'PTH_NAME', 'PTH_LINE']

PTH_NAME = 'mmboat_stack_fixes.pth'
# A .pth line that starts with "import" is executed; the try keeps an uninstalled mmboat from
# printing an error at every interpreter start.
PTH_LINE = ('import sys; exec("try:\\n    import mmboat._startup as _m; _m.install()\\n'
            'except Exception:\\n    pass")\n')


class _BeforeImport(importlib.abc.MetaPathFinder):
    """Runs a callback once, right before the named top-level module is first imported."""

    def __init__(self, name: str, callback) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            sys.meta_path.remove(self)  # once; the callback may import the module itself
            try:
                self.callback()
            except Exception as exc:  # never break the user's import
                import warnings
                warnings.warn(f'mmboat: the stack fix before importing {fullname} failed '
                              f'({type(exc).__name__}: {exc})', RuntimeWarning, stacklevel=2)
        return None  # the regular finders load the module


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback once, right after the named module is first imported."""

    def __init__(self, name: str, callback) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_callback(module):
            exec_module(module)
            try:
                self.callback()
            except Exception as exc:  # never break the user's import
                import warnings
                warnings.warn(f'mmboat: the hook after importing {fullname} failed '
                              f'({type(exc).__name__}: {exc})', RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_then_callback
        return spec


def _register_models() -> None:
    from mmboat.utils.model_index import register_with_mmpretrain

    register_with_mmpretrain()


def _fix_torchvision() -> None:
    from mmboat.utils.compat import fix_torchvision_import

    fix_torchvision_import()


def install() -> None:
    """Install the finder (idempotent; nothing to do when torchvision is already imported, or
    with ``MMBOAT_STARTUP_HOOK=0`` in the environment)."""
    import os

    if os.environ.get('MMBOAT_STARTUP_HOOK', '1') == '0':
        return
    if any(isinstance(f, (_BeforeImport, _AfterImport)) for f in sys.meta_path):
        return
    if 'torchvision' not in sys.modules:
        sys.meta_path.insert(0, _BeforeImport('torchvision', _fix_torchvision))
    if 'mmpretrain.apis.model' not in sys.modules:
        sys.meta_path.insert(0, _AfterImport('mmpretrain.apis.model', _register_models))


def install_pth(site_dir: str = None) -> str:
    """Write :data:`PTH_LINE` to ``<site_dir>/mmboat_stack_fixes.pth`` (default: this
    interpreter's first site-packages folder) and return the file's path."""
    import os
    import site

    site_dir = site_dir or site.getsitepackages()[0]
    path = os.path.join(site_dir, PTH_NAME)
    with open(path, 'w') as f:
        f.write(PTH_LINE)
    return path


if __name__ == '__main__':
    # `python -m mmboat._startup`: install the hook into this environment (setup_env.sh does).
    print(f'installed {install_pth()}')
