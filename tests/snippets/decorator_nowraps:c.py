# The decorator's argument changes: the decorated statement runs again, and the wrapper the
# module had bound must call the new function with the new argument.
OUTCOME = "patched"
PROBES = ["munch(4)", "munch(4, 2)"]


def plus(n):
    def deco(fn):
        def wrapper(*args):
            return fn(*args) + n
        return wrapper
    return deco


@plus(10)
def munch(x, y=0):
    return x * 4 + y
