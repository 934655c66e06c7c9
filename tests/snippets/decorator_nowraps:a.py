# A decorator that does not use functools.wraps: the module binds the wrapper, and the
# decorated function lives only in the wrapper's closure.
OUTCOME = "patched"
PROBES = ["munch(4)", "munch(4, 2)"]


def plus(n):
    def deco(fn):
        def wrapper(*args):
            return fn(*args) + n
        return wrapper
    return deco


@plus(1)
def munch(x, y=0):
    return x + 5 + y
