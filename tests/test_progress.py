import io

from gdistill.progress import LogLines


def test_log_lines_turn_a_redrawn_bar_into_lines():
    out = io.StringIO()
    log = LogLines(out)
    log.write("\rtrain:  10%|#         | 1/10")
    log.write("\r" + " " * 30 + "\r")  # tqdm clearing the line before a message
    log.write("\rtrain:  20%|##        | 2/10 [loss=3.1]   \x1b[A")
    log.write("\n")
    log.flush()
    assert out.getvalue() == "train:  10%|#         | 1/10\ntrain:  20%|##        | 2/10 [loss=3.1]\n"
    assert log.getvalue() == out.getvalue()  # anything else goes to the stream
