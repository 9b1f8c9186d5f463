"""Notifications: telling someone outside that a task changed (see :mod:`.notifier`).

:mod:`.policy` decides (which events become which messages, what an answer means, what follows
an attempt, an endpoint's health); :mod:`.notifier` runs the outbox's two loops; the channels
deliver: :mod:`.webhooks` (signed outbound webhooks), :mod:`.lifecycle` (app code),
:mod:`.wechat` (subscribe messages); :mod:`.endpoints` is what admins do with them.
"""
