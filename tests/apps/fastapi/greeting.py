def setup():
    pass


def text():
    return "v1"
