"""One video file -> 16-frame clip rows; every failure becomes a reason string, never a crash.

Steps, in the order a video goes through them, and the module that does each:
1. `probe.probe` reads the container header (PyAV) and rejects files that are not videos.
2. `windows.plan_windows` picks the clip windows (pure function of frame count, fps, cuts and
   ClipSpec); with ClipSpec.scene_cuts, `shots` finds the cuts (PySceneDetect) on the decoded
   frames and keeps every window inside one shot (`shots.ShotWindows` while decoding, in one pass).
3. `decode.decode_clips` decodes only the frames in those windows, downscaled at decode time and
   centre-cropped: decord first, PyAV when decord refuses the file (`decode.decode_chunks`
   yields them a chunk at a time).
4. `isolated.IsolatedDecoder` runs step 3 in a long-lived child process, because decord can hang
   while holding the GIL (decord#373) or segfault (decord#25, #229): a hang is killed at the
   timeout and a crash only costs the child, which is replaced on the next call. Its
   `decode_chunks` streams a video's clips a few at a time, so memory does not grow with the
   video's length.

`schema` holds what every step and every later stage shares: the column names, ClipSpec,
VideoError, video ids and error rows.

Rows are clips, never whole videos (ray#32746): one row holds frames uint8 [T, H, W, 3].
This package does not import ray; pipelines wrap it in Ray tasks and actors.
"""
