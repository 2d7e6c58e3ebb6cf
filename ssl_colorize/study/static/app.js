// The participant's side of the real-vs-fake study (docs/protocols.md section 6; ssl_colorize/study/plan.py).
// Each pair is shown for display_ms (1 s by default), then hidden; the participant clicks the photo
// whose colours are fake, with unlimited time. Practice trials get feedback from the server; test
// trials do not. The page never knows which side is fake before answering: the image URLs are opaque.
// document.body.dataset.state tells where the page is (intro, loading, showing, answer, saving,
// feedback, break, done, error), for people reading the DOM and for the automated tests.
"use strict";

(() => {
  const STORAGE_KEY = "ssl_colorize_study_session";
  const $ = (id) => document.getElementById(id);
  const SCREENS = ["intro-screen", "trial-screen", "break-screen", "done-screen"];

  let session = null;
  let displayMs = 1000;
  let current = 0;
  let breakDone = false;
  let hiddenAt = 0;
  let shownMs = null;
  let answering = false;

  function setState(state) {
    document.body.dataset.state = state;
  }

  function showScreen(name) {
    for (const id of SCREENS) $(id).hidden = id !== name;
  }

  async function api(method, url, body) {
    const options = { method, cache: "no-store", headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(url, options);
    const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  }

  function fail(error) {
    $("error").textContent = `Something went wrong: ${error.message}. Your earlier answers are saved; reload the page to resume.`;
    $("error").hidden = false;
    setState("error");
  }

  function setPairEnabled(enabled) {
    $("choose-left").disabled = !enabled;
    $("choose-right").disabled = !enabled;
  }

  function setImagesVisible(visible) {
    for (const id of ["left", "right"]) $(id).classList.toggle("hidden-image", !visible);
  }

  function loadImage(img, url) {
    return new Promise((resolve, reject) => {
      img.onload = () => resolve();
      img.onerror = () => reject(new Error(`could not load an image (${url})`));
      img.src = url;
    });
  }

  function progressText(index) {
    if (session.trials[index].phase === "practice") return `Practice pair ${index + 1} of ${session.practice}`;
    return `Pair ${index - session.practice + 1} of ${session.test}`;
  }

  async function runTrial(index) {
    showScreen("trial-screen");
    setState("loading");
    document.body.dataset.trial = String(index);
    document.body.dataset.phase = session.trials[index].phase;
    $("question").hidden = true;
    $("feedback").hidden = true;
    setPairEnabled(false);
    setImagesVisible(false);
    $("progress").textContent = progressText(index);
    const base = `/api/sessions/${encodeURIComponent(session.session)}/trials/${index}/`;
    await Promise.all([loadImage($("left"), base + "left"), loadImage($("right"), base + "right")]);
    await Promise.all([$("left").decode(), $("right").decode()]).catch(() => undefined);
    requestAnimationFrame(() => {
      setImagesVisible(true);
      const shownAt = performance.now();
      setState("showing");
      setTimeout(() => {
        setImagesVisible(false);
        shownMs = Math.round(performance.now() - shownAt);
        hiddenAt = performance.now();
        $("question").hidden = false;
        setPairEnabled(true);
        answering = true;
        setState("answer");
      }, displayMs);
    });
  }

  async function answer(side) {
    if (!answering) return;
    answering = false;
    setPairEnabled(false);
    setState("saving");
    const responseMs = Math.round(performance.now() - hiddenAt);
    let outcome;
    try {
      outcome = await api("POST", `/api/sessions/${encodeURIComponent(session.session)}/answers`, {
        trial: current, choice: side, response_ms: responseMs, shown_ms: shownMs,
      });
    } catch (error) {
      fail(error);
      return;
    }
    current = outcome.next;
    if (outcome.feedback) {
      const text = $("feedback-text");
      const fake = outcome.feedback.fake_side;
      text.textContent = outcome.feedback.correct
        ? `Correct: the ${fake} photo had the fake colours.`
        : `Not this time: the fake colours were on the ${fake}.`;
      text.className = outcome.feedback.correct ? "correct" : "wrong";
      $("question").hidden = true;
      $("feedback").hidden = false;
      setState("feedback");
      $("next").focus();
    } else {
      nextStep();
    }
  }

  function nextStep() {
    if (current >= session.trials.length) return finish();
    if (current === session.practice && session.practice > 0 && !breakDone) {
      $("break-test-count").textContent = String(session.test);
      showScreen("break-screen");
      setState("break");
      return undefined;
    }
    return runTrial(current).catch(fail);
  }

  function finish() {
    localStorage.removeItem(STORAGE_KEY);
    $("completion-code").textContent = session.session;
    showScreen("done-screen");
    setState("done");
  }

  function begin(started) {
    session = started;
    displayMs = started.display_ms;
    current = started.next;
    breakDone = current > started.practice;
    if (started.completed) return finish();
    return nextStep();
  }

  async function init() {
    const config = await api("GET", "/api/config");
    displayMs = config.display_ms;
    const seconds = displayMs / 1000;
    $("display-seconds").textContent = seconds === 1 ? "1 second" : `${seconds} seconds`;
    $("practice-count").textContent = String(config.practice);
    $("test-count").textContent = String(config.test);

    const saved = localStorage.getItem(STORAGE_KEY);
    if (saved) {
      try {
        const previous = await api("GET", `/api/sessions/${encodeURIComponent(saved)}`);
        if (!previous.completed) {
          $("resume").hidden = false;
          $("resume").onclick = () => begin(previous);
        }
      } catch (error) {
        localStorage.removeItem(STORAGE_KEY);
      }
    }
    $("start").onclick = async () => {
      $("start").disabled = true;
      try {
        const participant = $("participant").value.trim();
        const started = await api("POST", "/api/sessions", { participant: participant || null });
        localStorage.setItem(STORAGE_KEY, started.session);
        begin(started);
      } catch (error) {
        fail(error);
      }
    };
    $("choose-left").onclick = () => answer("left");
    $("choose-right").onclick = () => answer("right");
    $("next").onclick = () => nextStep();
    $("continue").onclick = () => {
      breakDone = true;
      nextStep();
    };
    document.addEventListener("keydown", (event) => {
      if (event.key === "ArrowLeft") answer("left");
      else if (event.key === "ArrowRight") answer("right");
    });
    setState("intro");
  }

  init().catch(fail);
})();
