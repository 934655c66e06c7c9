LABEL = "count"
TITLE = LABEL.title()


def text(hits):
    return f"v1 {hits}"
