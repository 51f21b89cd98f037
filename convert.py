"""Convert a Hugging Face LFM2-VL checkpoint to MLX: the same as `python -m mlx_lfm2vl.convert`."""

from mlx_lfm2vl.convert import main

if __name__ == "__main__":
    main()
