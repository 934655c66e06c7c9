# Two decorators; the outer one is swapped for another.
OUTCOME = "patched"
PROBES = ["munch(4)"]


def double(fn):
    def wrapper(x):
        return 2 * fn(x)
    return wrapper


def add_one(fn):
    def wrapper(x):
        return fn(x) + 1
    return wrapper


@add_one
@double
def munch(x):
    return x + 1
