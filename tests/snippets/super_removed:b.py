# Zero-argument super(): the method now needs the __class__ cell.
OUTCOME = "patched"
PROBES = ["Child().name()", "Child.name(Child())"]


class Base:
    def name(self):
        return "base"


class Child(Base):
    def name(self):
        return super().name() + "+child2"

