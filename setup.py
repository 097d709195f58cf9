"""Package setup: metadata and requirements come from settings.ini, the version from minimind/__init__.py."""
import re
from configparser import ConfigParser
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
cfg = ConfigParser(delimiters=["="])
cfg.read(here / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]
version = re.search(r'__version__\s*=\s*"([^"]+)"', (here / "minimind" / "__init__.py").read_text()).group(1)

setup(
    version=version,
    install_requires=cfg["requirements"].split(),
    extras_require={"dev": cfg["dev_requirements"].split()},
    keywords=cfg["keywords"].split(),
    package_data={"minimind": ["static/*"]},  # the server's chat page (html, css, js), lm-eval's exam subject names
)
