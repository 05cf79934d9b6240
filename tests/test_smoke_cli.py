from click.testing import CliRunner

from toolchain.cli import cli


def test_methods_lists_registered_methods():
    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0
    assert "magnitude" in result.output and "nm" in result.output and "int8" in result.output
