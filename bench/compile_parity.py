"""--compile against eager on any tiny family, by hand (not in the suite: it costs what test_dipp.py's SD check
costs again): 2 steps each, torch's aot_eager backend (the same graph capture as inductor, no C++ build), then how
far the compiled generator and fake score are from the eager ones, as a fraction of their update.

    python bench/compile_parity.py tiny_sd3      # or tiny, tiny_pixart, tiny_sdxl

test_dipp.py::test_compile_is_the_same_math_and_keeps_checkpoints_loadable asserts < 1 % on tiny SD."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dipp  # noqa: E402
import plumbing  # noqa: E402


def distance(a, b):
    return sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a) ** 0.5


def main(shapes="tiny_sd3"):
    plumbing.COMPILE_BACKEND = "aot_eager"
    out = tempfile.mkdtemp(prefix="dipp-compile-parity-")
    common = ["--random_weights", shapes, "--max_train_steps", "2", "--learning_rate", "1e-3",
              "--fake_learning_rate", "1e-3", "--checkpointing_steps", "1"]
    eager = dipp.main(common + ["--output_dir", os.path.join(out, "eager")])
    compiled = dipp.main(common + ["--compile", "default", "--output_dir", os.path.join(out, "compiled")])
    assert compiled["G"].net._compiled_call_impl is not None
    teacher = eager["teacher"].state_dict()  # θ0 = ψ0 = the teacher
    for net in ("G", "fake"):
        a, b = eager[net].state_dict(), compiled[net].state_dict()
        update = distance(a, {k: teacher[k.removeprefix("net.")] for k in a})
        print(f"{shapes} {net}: compiled − eager = {float(distance(a, b) / update):.2e} of the update")


if __name__ == "__main__":
    with plumbing.as_program("compile_parity"):
        main(*sys.argv[1:2])
