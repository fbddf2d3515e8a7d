from .compat import apply_stack_fixes, limit_cpu_threads

__all__ = ['apply_stack_fixes', 'limit_cpu_threads']
