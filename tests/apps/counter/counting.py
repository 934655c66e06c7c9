LABEL = "count"


def text(hits):
    return f"v1 {hits}"
