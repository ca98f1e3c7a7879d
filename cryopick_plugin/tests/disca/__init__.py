"""Tests of engine/disca (DoG candidates, extraction, DISCA)."""
