# Then the function again, with a new signature.
OUTCOME = "patched"
PROBES = ["munch(4)", "munch(4, 2)", "munch(4, 2, 1)"]


def plus(n):
    def deco(fn):
        def wrapper(*args):
            return fn(*args) + n
        return wrapper
    return deco


@plus(10)
def munch(x, y=0, z=100):
    return x * 100 + y + z
