"""Setuptools shim: the metadata lives in setup.cfg.

The package list is here because the twistd dropin directory ``twisted/plugins`` must not
have an ``__init__.py`` (it is a namespace shared with Twisted itself), which ``find:`` in
setup.cfg cannot express.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["twisted_gateway", "twisted_gateway.*"])
    + ["twisted.plugins"],
)
