"""The real-vs-fake perceptual study ("colorization Turing test", docs/protocols.md section 6).

``python -m ssl_colorize.study build | serve | report`` (see ``__main__``):

- :mod:`~ssl_colorize.study.plan`: the protocol's numbers and each session's trial plan;
- :mod:`~ssl_colorize.study.build`: renders the real, recolorized and random-colour images;
- :mod:`~ssl_colorize.study.db`: the answers in SQLite, with the rules that keep them whole;
- :mod:`~ssl_colorize.study.server`: the local web page and its JSON API;
- :mod:`~ssl_colorize.study.report`: per-arm rates, bootstrap standard errors, attention checks.
"""

from ssl_colorize.study.plan import Protocol, Trial, load_study, plan_session

__all__ = ["Protocol", "Trial", "load_study", "plan_session"]
