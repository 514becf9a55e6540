"""The command line as a user runs it: tables, one-line errors, exit statuses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import caffelayers
from caffelayers.cli import main


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_console_script_runs(cases_dir):
    script = Path(sys.executable).parent / "caffelayers"
    done = subprocess.run([str(script), "inspect", str(cases_dir / "sphereface4_deploy" / "net.prototxt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fc5" in done.stdout and "total parameters" in done.stdout


def test_inspect_table_on_bundled_model(capsys, cases_dir):
    case = cases_dir / "sphereface4_deploy"
    status, out, _ = run(capsys, "inspect", case / "net.prototxt", case / "weights.caffemodel")
    assert status == 0
    fc5 = next(line for line in out.splitlines() if line.startswith("fc5")).split()
    assert fc5 == ["fc5", "InnerProduct", "conv4_1", "->", "fc5", "2x64", "344,128"]
    assert "total parameters: 441,808" in out


def test_inspect_sphereface20_deploy_shapes_and_parameter_count(capsys, tmp_path, sphereface_prototxt):
    path = tmp_path / "sphereface_deploy.prototxt"
    path.write_text(sphereface_prototxt(train=False))
    status, out, _ = run(capsys, "inspect", path, "--json")
    assert status == 0
    report = json.loads(out)
    fc5 = next(row for row in report["layers"] if row["name"] == "fc5")
    assert fc5["shapes"] == [[1, 512]]
    # Published figure for SphereFace-20 without the classifier: about 22.7 M parameters.
    assert 22.5e6 < report["total_params"] < 22.9e6
    assert report["total_params_complete"]


def test_inspect_train_net_leaves_data_shapes_unknown_and_says_which_input(capsys, tmp_path,
                                                                          sphereface_prototxt):
    path = tmp_path / "sphereface_model.prototxt"
    path.write_text(sphereface_prototxt(train=True))
    status, out, _ = run(capsys, "inspect", path, "--phase", "TRAIN")
    assert status == 0
    assert "--input data=N,C,H,W" in out
    fc5 = next(line for line in out.splitlines() if line.startswith("fc5"))
    assert "?" in fc5
    status, out, _ = run(capsys, "inspect", path, "--phase", "TRAIN", "--input", "data=256,3,112,96",
                         "--json")
    assert status == 0
    rows = {row["name"]: row for row in json.loads(out)["layers"]}
    assert rows["fc5"]["shapes"] == [[256, 512]]
    assert rows["fc6"]["shapes"][0] == [256, 10572]


def test_inspect_lists_unknown_layers_and_exits_zero(capsys, tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "n"\nlayer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                    'layer { name: "a" type: "Frobnicate" bottom: "x" top: "a" }\n'
                    'layer { name: "b" type: "Python" bottom: "a" top: "b" }\n')
    status, out, _ = run(capsys, "inspect", path)
    assert status == 0
    assert "'a' (Frobnicate)" in out and "'b' (Python)" in out


def test_net_reports_every_unknown_layer_at_once(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "n"\nlayer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                    'layer { name: "a" type: "Frobnicate" bottom: "x" top: "a" }\n'
                    'layer { name: "b" type: "Python" bottom: "a" top: "b" }\n')
    with pytest.raises(caffelayers.UnknownLayerError) as caught:
        caffelayers.Net(path)
    message = str(caught.value)
    assert "'a' (Frobnicate)" in message and "'b' (Python)" in message
    assert "register_layer" in message and "never executed" in message
    assert caught.value.layers == [("a", "Frobnicate"), ("b", "Python")]


def test_bad_prototxt_is_one_error_line_with_file_and_line(capsys, tmp_path):
    path = tmp_path / "broken.prototxt"
    path.write_text('name: "n"\nlayer {\n  name: "x"\n  type: "Input"\n  top: "x"\n  input_param { shape { dim: 2 }\n')
    status, out, err = run(capsys, "inspect", path)
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "broken.prototxt:" in err
    assert "Traceback" not in err


def test_missing_file_is_an_error_not_a_traceback(capsys, tmp_path):
    status, _, err = run(capsys, "inspect", tmp_path / "nope.prototxt")
    assert status == 2 and err.startswith("error: ") and "nope.prototxt" in err


def test_weights_of_another_net_are_named(capsys, cases_dir):
    status, _, err = run(capsys, "inspect", cases_dir / "sphereface4_deploy" / "net.prototxt",
                         cases_dir / "classic_mix_deploy" / "weights.caffemodel")
    assert status == 2
    assert "do not fit" in err or "blob" in err


def test_bad_input_spec(capsys, cases_dir):
    net = cases_dir / "sphereface4_deploy" / "net.prototxt"
    status, _, err = run(capsys, "inspect", net, "--input", "data=a,b")
    assert status == 2 and "N,C,H,W" in err
    status, _, err = run(capsys, "inspect", net, "--input", "nosuch=1,2")
    assert status == 2 and "no input blob 'nosuch'" in err


def test_verify_prints_summary_and_exit_status(capsys, cases_dir):
    status, out, _ = run(capsys, "verify", cases_dir / "conv_basic")
    assert status == 0
    assert out.strip().splitlines()[-1].startswith("verify: PASS ")
    status, out, _ = run(capsys, "verify", cases_dir / "conv_basic", "--rtol", "0", "--atol", "0")
    assert status == 1
    assert "verify: FAIL" in out


def test_verify_on_a_directory_without_reference(capsys, tmp_path):
    status, _, err = run(capsys, "verify", tmp_path)
    assert status == 2 and "reference.npz" in err


@pytest.mark.parametrize("target, output", [("onnx", "new/m.onnx"), ("pytorch", "new/m"),
                                            ("torchscript", "new/m.pt")])
def test_convert_writes_a_model_that_matches_caffe(capsys, tmp_path, cases_dir, target, output):
    case = cases_dir / "sphereface4_deploy"
    status, out, _ = run(capsys, "convert", case / "net.prototxt", case / "weights.caffemodel",
                         "--to", target, "-o", tmp_path / output,
                         "--reference", case / "reference.npz")
    assert status == 0, out
    assert "wrote " in out
    assert out.strip().splitlines()[-1].startswith("verify: PASS 1/1 arrays")


def test_convert_without_weights_says_fillers_are_used(capsys, tmp_path, cases_dir):
    case = cases_dir / "conv_basic"
    status, _, err = run(capsys, "convert", case / "net.prototxt", "--to", "onnx",
                         "-o", tmp_path / "m.onnx")
    assert status == 0 and "fillers" in err
    status, out, _ = run(capsys, "convert", case / "net.prototxt", "--to", "onnx", "-o",
                         tmp_path / "m.onnx", "--reference", case / "reference.npz")
    assert status == 1 and "verify: FAIL" in out  # filler weights are not Caffe's


def test_convert_lists_every_layer_it_cannot_convert(capsys, tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "n"\nlayer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                    'layer { name: "a" type: "Frobnicate" bottom: "x" top: "a" }\n'
                    'layer { name: "b" type: "Python" bottom: "a" top: "b" }\n')
    for target in ("onnx", "pytorch"):
        status, _, err = run(capsys, "convert", path, "--to", target, "-o", tmp_path / "out")
        assert status == 2
        assert "'a' (Frobnicate)" in err and "'b' (Python)" in err


@pytest.mark.parametrize("runtime", ["onnxruntime", "pytorch-source", "torchscript"])
def test_verify_through_converted_models(capsys, cases_dir, runtime):
    status, out, _ = run(capsys, "verify", cases_dir / "classic_mix_deploy", "--runtime", runtime)
    assert status == 0, out
    assert out.strip().splitlines()[-1].startswith("verify: PASS")


def test_convert_rejects_shapes_that_do_not_fit_and_weights_of_another_net(capsys, tmp_path,
                                                                          cases_dir):
    case = cases_dir / "sphereface4_deploy"
    status, _, err = run(capsys, "convert", case / "net.prototxt", case / "weights.caffemodel",
                         "--to", "onnx", "-o", tmp_path / "m.onnx", "--input", "data=1,3,5,5")
    assert status == 2 and err.startswith("error: ") and "'fc5'" in err
    status, _, err = run(capsys, "convert", case / "net.prototxt",
                         cases_dir / "classic_mix_deploy" / "weights.caffemodel",
                         "--to", "pytorch", "-o", tmp_path / "m")
    assert status == 2 and "weights of another net" in err


def test_shape_errors_name_the_file_the_line_and_the_layer(capsys, tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "n"\n'
                    'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n'
                    'layer {\n  name: "pool"\n  type: "Pooling"\n  bottom: "x"\n  top: "p"\n'
                    '  pooling_param { pool: MAX kernel_size: 9 }\n}\n')
    status, _, err = run(capsys, "inspect", path)
    assert status == 2
    assert err.startswith(f"error: {path}:4: ") and "'pool'" in err
