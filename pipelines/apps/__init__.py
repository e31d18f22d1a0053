"""The apps on top of the stages: the `dora` command (cli), the quickstart that runs the whole chain
(quickstart, quickstart_report) and the Gradio demo (demo). Nothing below imports them.
"""
