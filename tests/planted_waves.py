"""The day of planted waves the waves tests share (``pipeline/moderation/test_waves.py`` on local disk,
``jobs/runtime/test_waves.py`` on moto S3 with an hourly partition): its date, the edits that make each
planted member, the waves (edited copies of two photos) and the unrelated photos uploaded beside them."""

DAY = "2026-05-03"
# each planted member: the edits that made it (the first upload of wave "astronaut" is the original)
EDITS = [["crop"], ["flip"], ["rescale_jpeg"], ["text"], ["color"], ["sticker"], ["frame_caption"], ["crop", "flip"]]
WAVES = {"astronaut": EDITS, "rocket": EDITS[1:7]}
UNRELATED_PHOTOS = ["camera", "coins", "horse", "moon", "page", "coffee", "brick", "grass", "gravel", "cell"]
