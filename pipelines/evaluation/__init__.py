"""Generation and judging: trained models -> videos -> scores.

Holds:
    generation      GenerateVideos: a trained bundle + prompts -> video files (a Ray Data stage)
    evaluate        the evaluation protocol: generated vs real clips -> FVD, cd-FVD, PSNR, held-out loss
    shape_detector  reads back the colour and direction of the demo's shapes from a video (the demo's judge)

Imports: cmd_model, pipelines.platform, pipelines.data
"""
