# The getter's body changes.
OUTCOME = "patched"
PROBES = ["FakeApple().color", "apple.color", "set_and_get('green')"]


class FakeApple:
    def __init__(self):
        self._color = "red"

    @property
    def color(self):
        return self._color.upper()

    @color.setter
    def color(self, value):
        self._color = value


apple = FakeApple()


def set_and_get(value):
    a = FakeApple()
    a.color = value
    return a.color
