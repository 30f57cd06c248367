"""`rnncap caption` encodes photos --batch-size at a time: same captions, same order, and a
broken photo in the middle of a batch costs only its own caption."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("PIL")

from rnncap.cli import main  # noqa: E402


def _photo(path, colour, size):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, (230, 230, 230))
    ImageDraw.Draw(im).ellipse((8, 8, size[0] // 2, size[1] // 2), fill=colour)
    im.save(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random LSTM on EfficientNet-Lite0 features whose captions depend on the photo
    (a scaled-up projection), 7 photos of several sizes and one broken file."""
    from rnncap.checkpoint import save_checkpoint
    from rnncap.encoding.encoders import get_encoder
    from rnncap.models.model import CaptioningModel
    from rnncap.data.vocab import Vocab

    tmp = tmp_path_factory.mktemp("batches")
    enc = get_encoder("efficientnet-lite0")
    vocab = Vocab.build(["a red ball on the green grass near blue water under a dark sky with one small tree"])
    model = CaptioningModel(len(vocab), enc.feature_dim, 8, 16, cell_type="lstm", seed=3)
    model.params["W_proj"] *= 60.0
    ckpt = tmp / "c.npz"
    save_checkpoint(ckpt, model, vocab, encoder=enc.identity(), configs={"data": {"max_length": 6}})
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (90, 90, 90),
               (250, 120, 0)]
    photos = [_photo(tmp / f"p{i}.{'png' if i % 2 else 'jpg'}", c, (80 + 23 * i, 60 + 11 * i))
              for i, c in enumerate(colours)]
    broken = tmp / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    photos.insert(4, str(broken))  # with --batch-size 3: the middle of the second batch
    return ckpt, photos, str(broken)


def _caption(capsys, ckpt, photos, *extra):
    code = main(["caption", *photos, "--checkpoint", str(ckpt), "--json", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_batches_give_the_captions_of_one_photo_at_a_time(setup, capsys):
    from rnncap.inference.sample import Captioner

    ckpt, photos, broken = setup
    good = [p for p in photos if p != broken]
    cap = Captioner.from_checkpoint(ckpt)
    one_by_one = [cap.caption(p) for p in good]
    assert len(set(one_by_one)) >= 3, one_by_one  # so a mix-up of photos would show
    for batch in ("1", "3", "16"):
        code, results, err = _caption(capsys, ckpt, photos, "--batch-size", batch)
        assert code == 1, err  # one photo failed
        assert [r["photo"] for r in results] == good
        assert [r["caption"] for r in results] == one_by_one, batch
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "broken.jpg" in lines[0] and "Traceback" not in err, err


def test_plain_output_keeps_the_order_and_reports_the_broken_photo_in_place(setup, capsys):
    ckpt, photos, broken = setup
    code = main(["caption", *photos, "--checkpoint", str(ckpt), "--batch-size", "3", "--beam", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [p for p in photos if p != broken]
    assert err.startswith("rnncap caption: error: ") and broken in err
    # All good photos: exit code 0.
    assert main(["caption", *photos[:3], "--checkpoint", str(ckpt), "--batch-size", "2"]) == 0


def test_batch_size_must_be_positive(setup, capsys):
    ckpt, photos, _ = setup
    with pytest.raises(SystemExit) as e:
        main(["caption", photos[0], "--checkpoint", str(ckpt), "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_encoder_features_do_not_depend_on_the_batch(setup):
    """Why batching may not change a caption: each photo's features are its own."""
    from rnncap.inference.sample import Captioner

    ckpt, photos, broken = setup
    good = [p for p in photos if p != broken]
    cap = Captioner.from_checkpoint(ckpt)
    together = cap.features(good)
    alone = np.concatenate([cap.features([p]) for p in good])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


def test_caption_many_encodes_the_next_batch_meanwhile_and_keeps_the_order(setup):
    from rnncap.errors import DataError
    from rnncap.inference.sample import Captioner

    ckpt, photos, broken = setup
    good = [p for p in photos if p != broken]
    cap = Captioner.from_checkpoint(ckpt)
    assert cap.caption_many(good, batch_size=2) == [cap.caption(p) for p in good]
    with pytest.raises(DataError, match="broken.jpg"):  # raised in its own batch's turn
        cap.caption_many(photos, batch_size=2)
