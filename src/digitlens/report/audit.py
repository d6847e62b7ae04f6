"""Find the percentages in a report (or any generated text) that carry no 95% interval.

Every rate the report estimates from a sample of images (an accuracy, the share of a digit read
as another, a mean confidence) is printed with its interval: ``99.31% (99.13-99.45)`` or
``99.31% (95% interval 99.13-99.45%)``. :func:`bare_percentages` returns the others, except the
numbers of :data:`NOT_ESTIMATES`: percentages that are not estimates from a sample, each listed
with the reason. A test runs it on the demo's report.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_NUM = r"[+-]?\d+(?:\.\d+)?"
#: A percentage.
PERCENT = re.compile(_NUM + "%")
#: A percentage followed by its interval: ``99.31% (99.13-99.45)`` or ``99.31% (95% interval 99.13-99.45%)``.
WITH_INTERVAL = re.compile(rf"{_NUM}% \((?:95% interval )?{_NUM}-{_NUM}%?\)")
#: The confidence level of an interval ("95% interval", "95% CI", "intervals are 95%").
LEVEL = re.compile(r"\b95% (?:interval|CI|confidence|Wilson|bootstrap|percentile|paired)|intervals are 95%")

#: Percentages that are not estimated from a sample of images: (pattern, why no interval).
NOT_ESTIMATES: tuple[tuple[str, str], ...] = (
    (rf"\({_NUM}% of the model\)", "trainable parameters as a share of all: an exact ratio of two counts"),
    (rf"with {_NUM}% confidence", "one image's predicted probability, not an estimate from a sample"),
    (rf"hold {_NUM}-{_NUM}% of their ink, [\w ]+ puts {_NUM}-{_NUM}% of its map",
     "shares of ink and attribution mass in the averaged maps drawn beside it, not rates over images"),
    (rf"hold {_NUM}% of the attribution for digit \w+ \(most focused\) and {_NUM}% for digit",
     "shares of attribution mass in the averaged maps drawn beside it, not rates over images"),
    (rf"rose {_NUM}% by the last epoch", "relative change of the validation loss, not a proportion"),
    (rf"by more than {_NUM}%", "the threshold of the overfitting rule"),
    (rf"norm under {_NUM}% of the largest", "the threshold of the flat-kernel rule"),
    (rf"ends > {_NUM}% above its minimum", "the threshold of the overfitting rule"),
    (rf"is {_NUM}% above its minimum", "relative change of the validation loss, not a proportion"),
    (rf"(?:final|ends at) \d+\.\d+,? \(?{_NUM}%\)", "relative change of the validation loss, not a proportion"),
    (rf"\(n\+1\)/\(n\+2\) = {_NUM}%", "the target confidence of the rule of succession, not an estimate"),
    (rf"completeness error of {_NUM}%", "numerical error of the integration, not a rate over images"),
    (rf"training accuracy then {_NUM}%, measured during the epoch",
     "older runs: Keras' in-epoch running mean over a model that changes during the epoch, not one model's rate"),
    (rf"train accuracy {_NUM}% \(measured during training",
     "older runs: Keras' in-epoch running mean over a model that changes during the epoch, not one model's rate"),
    (rf"test accuracy is {_NUM}% ± {_NUM} \(min {_NUM}%, max {_NUM}%\)",
     "mean over seed runs: its uncertainty is the spread over seeds printed with it"),
    (rf"Mean {_NUM}%", "seed group table: mean over seed runs; the rows below give its spread"),
    (rf"Min – max {_NUM}% – {_NUM}%", "seed group table: the spread over seed runs"),
    (rf"reaches {_NUM}(?:%|-{_NUM}%) over \d+ seeds? against full fine-tuning's {_NUM}(?:%|-{_NUM}%)",
     "LoRA verdict: the range (min-max) of test accuracy over seeds, the spread the verdict is about"),
    (rf"r = \d+ \({_NUM}(?:%|-{_NUM}%)\)", "LoRA verdict: a rank's range of test accuracy over seeds"),
)


class _Text(HTMLParser):
    """The visible text of an HTML page (no <style> or <script>)."""

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def visible_text(html: str) -> str:
    """The text a reader sees in ``html``, whitespace collapsed to single spaces."""
    parser = _Text()
    parser.feed(html)
    return re.sub(r"\s+", " ", " ".join(parser.parts))


def _covered(text: str, patterns) -> list[tuple[int, int]]:
    return [m.span() for p in patterns for m in re.finditer(p, text)]


def bare_percentages(text: str, context: int = 60) -> list[str]:
    """Each percentage in ``text`` (plain text, or HTML: tags are stripped) that has no interval and
    is not one of :data:`NOT_ESTIMATES`, with ``context`` characters either side; empty when none."""
    if "<" in text and ">" in text:
        text = visible_text(text)
    spans = _covered(text, [WITH_INTERVAL, LEVEL] + [p for p, _ in NOT_ESTIMATES])
    found = []
    for m in PERCENT.finditer(text):
        if not any(a <= m.start() and m.end() <= b for a, b in spans):
            found.append(text[max(0, m.start() - context):m.end() + context])
    return found
