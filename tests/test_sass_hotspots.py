"""profiling/ncu/sass_hotspots.py on a small CSV in ncu's source-page format (CPU)."""
import pytest

from profiling.ncu import sass_hotspots as sh

HDR = ['"Address"', '"Source"', '"Warp Stall Sampling (All Samples)"', '"Warp Stall Sampling (Not-issued Samples)"',
       '"Instructions Executed"', '"stall_long_sb"', '"stall_wait"', '"stall_long_sb (Not Issued)"']


def _write(tmp_path, rows):
    p = tmp_path / "sass.csv"
    lines = ['"Kernel Name","k"', ",".join(HDR)] + [",".join(f'"{c}"' for c in r) for r in rows]
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_hotspots_ranks_and_splits(tmp_path):
    path = _write(tmp_path, [
        ["0x10", "LDG.E R89, desc[UR34][R88.64]", "10", "9", "100", "0", "10", "0"],
        ["0x20", "@!P0  SHF.R.W.U32.HI R14, RZ, R14, R89", "70", "69", "100", "60", "10", "60"],
        ["0x30", "FMNMX R1, R2, R3, !PT", "20", "19", "100", "5", "15", "5"],
    ])
    s = sh.summarize(sh.load(path), top=2)
    assert s["total_samples"] == 100
    assert [t["idx"] for t in s["top"]] == [1, 2]  # the two hottest, in listing order
    assert s["top"][0]["share"] == pytest.approx(0.7)
    assert s["top"][0]["reasons"] == {"long_sb": pytest.approx(0.6), "wait": pytest.approx(0.1)}
    assert s["reasons"] == {"wait": pytest.approx(0.35), "long_sb": pytest.approx(0.65)}  # "(Not Issued)" not added
    assert s["opcodes"]["SHF"] == pytest.approx(0.7) and sh.opcode("@!P0 IMAD.WIDE.U32 R1") == "IMAD"


def test_hotspots_rejects_other_csv(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('"a","b"\n"1","2"\n')
    with pytest.raises(ValueError, match="Source"):
        sh.load(str(p))
    with pytest.raises(ValueError, match="no warp-state samples"):
        sh.summarize(sh.load(_write(tmp_path, [["0x10", "NOP", "0", "0", "1", "0", "0", "0"]])))
