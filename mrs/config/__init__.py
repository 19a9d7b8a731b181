"""Typed configuration: dataclasses registered in Hydra's ConfigStore, plus the seed's JSON parser."""
