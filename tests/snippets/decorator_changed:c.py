# A function edit after the decorator change.
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


@double
@add_one
def munch(x):
    return x * 100 + 1
