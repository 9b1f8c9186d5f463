"""Coze text extraction: a WeChat mini-program sends a video link, a Coze workflow extracts its
text and posts it to the task's signed callback URL, and the user gets a subscribe message.

    errands serve --app app      # with the settings of README.md
"""

import os

from errands import Errands, WeChatTemplate
from errands.providers.coze import CozeProvider

app = Errands()

coze = CozeProvider(
    api_token=os.environ["COZE_API_TOKEN"],
    workflow_id=os.environ["COZE_WORKFLOW_ID"],
    base_url=os.environ.get("COZE_BASE_URL", "https://api.coze.cn"),  # https://api.coze.com outside China
)

# The workflow is run with {"video_url", "callback_url"}; its HTTP nodes post progress and then
# the result to callback_url, a URL signed for this task's current attempt alone. When that post
# is lost, errands asks Coze for the run's history instead: poll_after_s after the submission,
# then every poll_every_s until the run has ended.
app.external(
    "extract_text",
    provider=coze,
    timeout_s=600,
    poll_after_s=float(os.environ.get("COZE_POLL_AFTER_S", "60")),
    poll_every_s=float(os.environ.get("COZE_POLL_EVERY_S", "10")),
)

# When the task ends, its owner (the user's openid) gets this subscribe message, once; tapping it
# opens the page on the task. The keys are the template's fields, as WeChat lists them.
app.wechat(
    [
        WeChatTemplate(
            os.environ.get("WECHAT_TEMPLATE_ID", "YOUR_TEMPLATE_ID"),
            data={"thing1": "视频文案提取", "time2": "{finished_at}", "phrase3": "{outcome}"},
            page="pages/extract/extract?taskId={id}",
        )
    ]
)
